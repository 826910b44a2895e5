"""Sharded training equals one device, for every layout of the issue (8 CPU devices)."""

import jax
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.train.sharded import ShardedTraining

BASE = [
    "model.vocab_size=256",
    "model.d_model=64",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",  # fewer KV heads than tensor=4: replicated K/V heads
    "model.mlp_dim=128",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.lr=1e-2",
]

LAYOUTS = {
    "data=8": ["mesh.data=8"],
    "fsdp=8 zero1": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=1"],
    "fsdp=8 zero2": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=2"],
    "fsdp=8 zero3": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3"],
    "data=2 tensor=4": ["mesh.data=2", "mesh.tensor=4"],
    "fsdp=2 tensor=2 data=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "pipeline=2 data=4": ["mesh.pipeline=2", "mesh.data=4"],
    "pipeline=4 tensor=2": ["mesh.data=1", "mesh.pipeline=4", "mesh.tensor=2"],
}


def batches(n=3, rows=8, seq=32, vocab=256):
    """n batches of distinct rows, each a random walk with small steps (learnable in a few updates)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        b = np.cumsum(rng.integers(-2, 3, (rows, seq + 1)), axis=1) % vocab
        out.append({"inputs": b[:, :-1].astype(np.int32), "targets": b[:, 1:].astype(np.int32)})
    return out


def train_steps(overrides, model="llama_tiny"):
    """Losses of 3 steps and the parameters after them (gathered to host)."""
    sharded = ShardedTraining(load_config(f"configs/{model}.yaml", BASE + overrides))
    state = sharded.init_state()
    losses = []
    for b in batches():
        state, metrics = sharded.train_step(state, sharded.put_batch(b))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), sharded


_REFERENCE = {}


def reference(model="llama_tiny", extra=()):
    key = (model, tuple(extra))
    if key not in _REFERENCE:
        _REFERENCE[key] = train_steps(["mesh.data=1", *extra], model)[:2]
    return _REFERENCE[key]


def assert_same(got, want):
    (losses, params), (ref_losses, ref_params) = got, want
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat, ref_flat = jax.tree.leaves_with_path(params), jax.tree.leaves(ref_params)
    assert len(flat) == len(ref_flat)
    for (path, a), b in zip(flat, ref_flat):
        if "'bk'" in jax.tree_util.keystr(path):
            # The key bias adds q.b to every score of a row; softmax ignores that, so its true gradient is 0
            # and Adam turns rounding noise into +-lr steps: nothing to compare.
            continue
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(layout):
    losses, params, sharded = train_steps(LAYOUTS[layout])
    assert sharded.mesh.size == 8
    assert_same((losses, params), reference())
    assert losses[-1] < losses[0]  # it trains


@pytest.mark.parametrize(
    "layout,extra",
    [
        ("pipeline=2 data=4", ["model.remat=full", "train.grad_accum=2", "mesh.microbatches=1"]),
        ("fsdp=2 tensor=2 data=2", ["model.remat=save_dots", "model.scan_layers=false"]),
        ("pipeline=4 tensor=2", ["model.remat=save_dots", "model.scan_layers=false", "mesh.microbatches=8"]),
        # circular, 2 groups of 2 micro-batches, on pipeline=2 x data=2 x tensor=2
        ("pipeline=2 data=4", ["mesh.data=2", "mesh.tensor=2", "mesh.pipeline_repeats=2", "mesh.microbatches=4"]),
    ],
)
def test_remat_scan_and_accumulation_under_meshes(layout, extra):
    """Remat policies, the unrolled layer loop, gradient accumulation and the circular pipeline
    schedule change nothing numerically."""
    assert_same(train_steps(LAYOUTS[layout] + extra)[:2], reference())


DROPOUT = ["model.dropout=0.1", "model.attention_dropout=0.1", "model.mlp_dropout=0.1"]


@pytest.mark.parametrize(
    "layout,extra",
    [
        ("pipeline=2 data=4", ["train.grad_accum=2", "mesh.microbatches=1"]),
        ("fsdp=2 tensor=2 data=2", []),
        ("pipeline=4 tensor=2", ["model.remat=full"]),
        ("pipeline=2 data=4", ["mesh.pipeline_repeats=2"]),
    ],
)
def test_dropout_is_the_same_on_every_layout(layout, extra):
    """Dropout masks come from one key per row of the global batch: meshes, pipeline micro-batches and
    gradient accumulation split rows but never change a row's mask, so runs stay reproducible."""
    want = reference(extra=DROPOUT)
    assert not np.allclose(want[0], reference()[0], rtol=1e-4)  # dropout acts
    assert_same(train_steps(LAYOUTS[layout] + DROPOUT + extra)[:2], want)


@pytest.mark.parametrize("rate", DROPOUT)
def test_each_dropout_rate_alone_acts(rate):
    """Any one rate above 0 makes the train step draw masks (one device)."""
    assert not np.allclose(reference(extra=[rate])[0], reference()[0], rtol=1e-4)


def test_gpt_tensor_parallel_with_biases_and_tied_vocab():
    """GPT-2 wiring: biases, LayerNorm, learned positions, vocabulary-parallel tied embedding."""
    extra = ["model.num_kv_heads=0"]
    got = train_steps(["mesh.data=2", "mesh.tensor=2", "mesh.fsdp=2", *extra], "gpt_tiny")[:2]
    assert_same(got, reference("gpt_tiny", extra))


def _bytes_per_device(tree) -> dict:
    out = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_zero_stages_shard_state_bytes(zero_stage):
    """Measured shard sizes: ZeRO-1 splits optimizer state 8 ways, ZeRO-3 also the parameters."""
    cfg = load_config("configs/llama_tiny.yaml", BASE + ["mesh.data=1", "mesh.fsdp=8", f"mesh.zero_stage={zero_stage}"])
    sharded = ShardedTraining(cfg)
    state = sharded.init_state()
    total_params = sum(x.nbytes for x in jax.tree.leaves(state.params))
    total_opt = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    params, opt = _bytes_per_device(state.params), _bytes_per_device(state.opt_state)
    assert len(params) == len(opt) == 8
    # Leaves with no `embed` axis stay whole (here: none but the optimizer's step counters).
    leftover_opt = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
    for device in params:
        if zero_stage >= 3:
            assert params[device] <= total_params / 8
        else:
            assert params[device] == total_params
        if zero_stage >= 1:
            assert opt[device] <= (total_opt - leftover_opt) / 8 + leftover_opt
        else:
            assert opt[device] == total_opt


@pytest.mark.parametrize("extra", [[], DROPOUT], ids=["plain", "dropout"])
def test_encoder_decoder_under_fsdp_tensor_data(extra):
    """T5 (relative bias tables, cross-attention) sharded like the decoders gives the same losses."""
    base = ["model.vocab_size=256", "model.d_model=64", "model.num_layers=2", "model.decoder_layers=2"]
    base += ["model.num_heads=4", "model.head_dim=16", "model.mlp_dim=128", "data.seq_len=32"]
    base += ["train.batch_size=8", "train.warmup_steps=1", "train.lr=1e-2", *extra]
    rng = np.random.default_rng(0)
    batch = {
        "src": rng.integers(0, 200, (8, 32)).astype(np.int32),
        "src_mask": np.arange(32)[None] < rng.integers(8, 33, (8, 1)),
        "tgt_in": rng.integers(0, 200, (8, 12)).astype(np.int32),
        "tgt_out": rng.integers(0, 200, (8, 12)).astype(np.int32),
        "tgt_mask": np.ones((8, 12), bool),
    }

    def run(mesh):
        sharded = ShardedTraining(load_config("configs/t5_tiny.yaml", base + mesh))
        state, losses = sharded.init_state(), []
        for _ in range(3):
            state, metrics = sharded.train_step(state, sharded.put_batch(batch))
            losses.append(float(metrics["loss"]))
        return np.array(losses)

    one_device = run(["mesh.data=1"])
    np.testing.assert_allclose(run(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), one_device, rtol=1e-5)
    if extra:  # encoder and decoder dropout act
        assert not np.allclose(one_device, run(["mesh.data=1", "model.dropout=0", "model.attention_dropout=0"]))


GEMMA = ["model.post_norms=true", "model.qk_norm=true", "model.norm_offset=1.0", "model.embed_scale=true"]
GEMMA += ["model.attn_logit_softcap=5.0", "model.final_logit_softcap=10.0", "model.activation=gelu_tanh"]
GEMMA += ["model.sliding_window=8", "model.global_every=2", "model.rope_local_theta=100.0"]


@pytest.mark.parametrize("layout", ["fsdp=2 tensor=2 data=2", "pipeline=2 data=4"])
def test_gemma_features_under_meshes(layout):
    """Gemma's post-norms, q/k norms (head_dim-axis scales), soft-caps and alternating local/global layers
    with two RoPE bases: sharded and pipelined (stages see their global layer ids) equal one device."""
    assert_same(train_steps(LAYOUTS[layout] + GEMMA)[:2], reference(extra=GEMMA))


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt", "prefix"])
def test_peft_under_fsdp_tensor_matches_one_device(method):
    """Adapters (and NF4 codes) carry logical axes: PEFT training over fsdp x tensor x data equals one device."""
    extra = [f"peft.method={method}", "peft.rank=4", "peft.virtual_tokens=4", "model.max_seq_len=40"]
    extra += ["peft.prefix_hidden=16"] if method == "prefix" else []
    losses, params, sharded = train_steps(LAYOUTS["fsdp=2 tensor=2 data=2"] + extra)
    assert sharded.mesh.size == 8 and len(jax.tree.leaves(params)) > 0
    assert_same((losses, params), reference(extra=extra))
    assert losses[-1] != losses[0]  # the adapters moved (3 steps do not always lower a prompt's loss)


MOE = ["model.num_experts=4", "model.experts_per_token=2", "model.expert_mlp_dim=32", "model.shared_experts=1"]
MOE_LOSSES = ["model.aux_loss_weight=0.01", "model.router_z_loss_weight=0.001"]


@pytest.mark.parametrize(
    "layout,extra",
    [
        ("data=8", MOE_LOSSES),
        ("fsdp=8 zero3", MOE_LOSSES),
        ("data=2 tensor=4", MOE_LOSSES),
        ("fsdp=2 tensor=2 data=2", [*MOE_LOSSES, "model.remat=full", "train.grad_accum=2"]),
        ("pipeline=2 data=4", []),  # the routers' losses are not collected through the pipeline schedule
    ],
)
def test_mixture_of_experts_layouts_match_one_device(layout, extra):
    """Experts (dropless, with a shared expert and the routers' losses) train the same on every layout. (The
    balancing loss is a function of the tokens it sees: gradient accumulation computes it per micro-batch, in
    the reference too.)"""
    want = reference(extra=[*MOE, *(e for e in extra if not e.startswith("model.remat"))])
    losses, params, _ = train_steps(LAYOUTS[layout] + MOE + extra)
    assert_same((losses, params), want)
    assert losses[-1] < losses[0]


EXPERT_LAYOUTS = {
    "expert=4 data=2": ["mesh.data=2", "mesh.expert=4"],
    "expert=2 fsdp=4 zero3": ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2", "mesh.zero_stage=3"],
    "expert=2 data=2 tensor=2": ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"],
    "expert=4 tensor=2 remat": ["mesh.data=1", "mesh.expert=4", "mesh.tensor=2", "model.remat=full"],
}


@pytest.mark.parametrize("layout", list(EXPERT_LAYOUTS))
def test_expert_parallelism_matches_one_device(layout):
    """Experts split over mesh.expert, tokens exchanged all-to-all (dropless): the same losses and parameters
    as one device, composed with data, FSDP (ZeRO-3) and tensor parallelism."""
    losses, params, sharded = train_steps(EXPERT_LAYOUTS[layout] + MOE + MOE_LOSSES)
    assert sharded.mesh.shape["expert"] > 1
    assert_same((losses, params), reference(extra=[*MOE, *MOE_LOSSES]))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_expert_lora_under_expert_parallelism_matches_one_device(method):
    """Per-expert LoRAs travel with their experts (A and B split over mesh.expert like the expert weights):
    the same losses and adapters as one device; QLoRA's NF4 experts too."""
    extra = [*MOE, *MOE_LOSSES, f"peft.method={method}", "peft.rank=4", "peft.targets=[q,gate,up,down]"]
    losses, params, sharded = train_steps(EXPERT_LAYOUTS["expert=4 data=2"] + extra)
    assert sharded.mesh.shape["expert"] == 4
    assert any("lora_w_gate" in jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(params))
    assert_same((losses, params), reference(extra=extra))
    assert losses[-1] != losses[0]


def test_expert_parallel_capacity_drops_and_counts():
    """With a capacity, each device sends at most ceil(f * its assignments / P) to each device: a router that
    sends everything to a few experts drops the rest, counted in the metrics, and training goes on."""
    extra = ["mesh.data=2", "mesh.expert=4", *MOE, "model.capacity_factor=0.5"]
    sharded = ShardedTraining(load_config("configs/llama_tiny.yaml", BASE + extra))
    state = sharded.init_state()
    state, metrics = sharded.train_step(state, sharded.put_batch(batches(1)[0]))
    assert 0 < float(metrics["moe_dropped"]) < 1
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["mesh.data=2", "mesh.expert=4"], "the model has none"),
        (["mesh.data=1", "mesh.expert=8", *MOE], r"model.num_experts \(4\) must be divisible by mesh.expert \(8\)"),
        (["mesh.data=2", "mesh.expert=2", "mesh.pipeline=2", *MOE], "does not run inside the pipeline"),
        (["mesh.data=4", "mesh.pipeline=2", *MOE, *MOE_LOSSES], "not collected through the pipeline"),
    ],
)
def test_expert_axis_that_cannot_split_is_refused(extra, message):
    from jaxlm.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ShardedTraining(load_config("configs/llama_tiny.yaml", BASE + extra))
