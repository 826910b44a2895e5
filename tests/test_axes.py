import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.axes import logical_to_spec, rules_for
from jaxlm.config import ConfigError, MeshConfig, load_config
from jaxlm.parallel.mesh import check_layout, make_mesh
from jaxlm.train.sharded import ShardedTraining

SIZES = {"pipeline": 2, "data": 1, "fsdp": 2, "tensor": 2}


def test_zero_stage_decides_what_splits_embed():
    axes, shape = ("layers", "embed", "mlp"), (4, 64, 128)
    spec = lambda kind, z: logical_to_spec(axes, shape, rules_for(kind, z), SIZES)  # noqa: E731
    assert spec("params", 3) == P("pipeline", "fsdp", "tensor")
    assert spec("params", 2) == P("pipeline", None, "tensor")
    assert spec("grads", 2) == spec("opt_state", 1) == P("pipeline", "fsdp", "tensor")
    assert spec("grads", 1) == P("pipeline", None, "tensor")
    assert spec("activations", 3) == P("pipeline", None, "tensor")


def test_uneven_split_is_an_error_naming_the_dimension():
    with pytest.raises(ConfigError, match=r"layers.mlp.w_up: dimension 'mlp' of size 129 .* tensor=2"):
        logical_to_spec(("embed", "mlp"), (64, 129), rules_for("params", 3), SIZES, where="layers.mlp.w_up")


def test_fewer_kv_heads_than_tensor_ranks_replicates_them():
    sizes = {**SIZES, "tensor": 4}
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), rules_for("params", 0), sizes) == P(
        None, None, None
    )
    assert logical_to_spec(("embed", "heads"), (64, 8), rules_for("params", 0), sizes) == P(None, "tensor")


def test_size_one_mesh_axes_are_left_out():
    sizes = {"pipeline": 1, "data": 8, "fsdp": 1, "tensor": 1}
    assert logical_to_spec(("batch", "seq"), (8, 3), rules_for("activations", 3), sizes) == P("data", None)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ConfigError, match="logical axis 'expert' has no sharding rule"):
        logical_to_spec(("expert",), (4,), rules_for("params", 3), SIZES)


@pytest.mark.parametrize(
    "mesh,devices,message",
    [
        (dict(data=4, tensor=4), 8, "needs 16 devices but 8 are available"),
        (dict(data=-1, tensor=3), 8, "the fixed axes multiply to 3, which does not divide 8"),
        (dict(data=-1, fsdp=-1), 8, "at most one mesh axis may be -1"),
        (dict(data=0), 8, "mesh.data must be a positive size or -1"),
        (dict(zero_stage=4), 8, "mesh.zero_stage must be 0, 1, 2 or 3"),
        (dict(pipeline_repeats=0), 8, "mesh.pipeline_repeats must be >= 1"),
    ],
)
def test_mesh_that_does_not_fit_fails_clearly(mesh, devices, message):
    with pytest.raises(ConfigError, match=message):
        MeshConfig(**mesh).resolve(devices)


def test_mesh_uses_the_first_devices_when_smaller():
    mesh = make_mesh(MeshConfig(data=2, tensor=2))
    assert dict(mesh.shape) == {"pipeline": 1, "data": 2, "fsdp": 1, "context": 1, "expert": 1, "tensor": 2}
    assert list(mesh.devices.flat) == jax.devices()[:4]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.batch_size=6", "mesh.data=4"], "6 rows, which do not split over data x fsdp x expert = 4"),
        (["model.num_layers=3", "mesh.pipeline=2"], r"num_layers \(3\) must be divisible by mesh.pipeline \(2\)"),
        (["mesh.pipeline=2", "mesh.microbatches=3"], r"must be divisible by mesh.microbatches \(3\)"),
        (["mesh.pipeline=2", "mesh.pipeline_repeats=4"], r"num_layers \(4\) must be divisible by mesh.pipeline x"),
        (["mesh.pipeline=2", "mesh.pipeline_repeats=2", "mesh.microbatches=1"], r"must be a multiple of it"),
        (["mesh.pipeline_repeats=2"], r"pipeline_repeats=2 needs mesh.pipeline > 1"),
    ],
)
def test_layout_errors(overrides, message):
    cfg = load_config("configs/llama_tiny.yaml", ["train.batch_size=8", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_layout(cfg, cfg.mesh.resolve(8))


def test_bad_mesh_fails_before_anything_is_compiled(monkeypatch):
    cfg = load_config("configs/llama_tiny.yaml", ["mesh.data=16"])
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before checking the mesh"))
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        ShardedTraining(cfg)


def test_vocab_that_tensor_parallel_cannot_split():
    cfg = load_config("configs/llama_tiny.yaml", ["model.vocab_size=2049", "mesh.data=4", "mesh.tensor=2"])
    with pytest.raises(ConfigError, match="embed.embedding: dimension 'vocab' of size 2049"):
        ShardedTraining(cfg)
