"""The train and eval steps compiled for a device mesh (the pjit model).

`ShardedTraining(cfg)` builds the mesh from `cfg.mesh`, checks the layout,
derives every sharding from the parameters' logical axes, and jits the pure
steps with explicit `in_shardings`/`out_shardings` and donated state.
The trainer, the benchmarks and the tests all go through it, so what is
tested is what runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.axes import activation_sharding
from jaxlm.config import Config
from jaxlm.nn.models import build_model
from jaxlm.parallel.mesh import check_layout, describe, make_mesh
from jaxlm.parallel.pipeline import pipeline
from jaxlm.parallel.state import batch_sharding, local_rows, replicated, to_global, tree_shardings
from jaxlm.peft import apply_peft, trainable
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.policy_gradient import make_grpo_loss, make_ppo_loss
from jaxlm.train.preference import make_dpo_loss, make_reward_loss
from jaxlm.train.step import (
    LossScale,
    TrainState,
    init_train_state,
    make_eval_step,
    make_objective,
    make_train_step,
    split_model,
    train_state_shardings,
)


def on_mesh(fn, mesh):
    """fn, traced with activation sharding constraints for `mesh`."""

    def traced(*args):
        with activation_sharding(mesh):
            return fn(*args)

    return traced


def reference_for(cfg: Config) -> str:
    """The reference policy of cfg's objective (`jaxlm.train.step.REFERENCES`): DPO's, PPO's and GRPO's is the
    starting model, kept as a copy, or with LoRA the same weights with the adapters off."""
    if cfg.train.objective not in ("dpo", "ppo", "grpo"):
        return "none"
    return "adapters_off" if cfg.peft.method in ("lora", "qlora") else "copy"


class ShardedTraining:
    def __init__(self, cfg: Config, devices=None, *, mask_id: int | None = None, prompt_init_ids=None):
        """mask_id: the tokenizer's mask token (train.objective=mlm). prompt_init_ids: prompt tuning's initial
        text as token ids (peft.prompt_init_text)."""
        tc = cfg.train
        self.cfg = cfg
        # Mesh and layout first: a mesh that does not fit fails before anything is built or compiled.
        self.mesh = make_mesh(cfg.mesh, devices)
        self.sizes = dict(self.mesh.shape)
        self.microbatches = check_layout(cfg, self.sizes)
        self.tx = make_optimizer(tc)

        self.trainable = trainable(cfg.peft)

        def build(base=None):
            """The model (and its PEFT adapters); base: the weights to start from (nnx.State of Params)."""
            model = build_model(cfg.model, rngs=nnx.Rngs(tc.seed))
            if base is not None:
                nnx.update(model, base)
            return apply_peft(model, cfg.peft, seed=tc.seed, init_ids=prompt_init_ids)

        runner = None
        if self.sizes["pipeline"] > 1:  # the model's layers run as a pipeline over the `pipeline` mesh axis
            runner = functools.partial(
                pipeline,
                num_stages=self.sizes["pipeline"],
                num_microbatches=self.microbatches,
                num_repeats=cfg.mesh.pipeline_repeats,
            )

        self.scaling = tc.precision == "fp16"  # dynamic loss scaling
        scale = tc.loss_scale if self.scaling else 1.0
        self.reference = reference_for(cfg)
        self._init = lambda base=None: init_train_state(
            build(base), self.tx, tc.seed, scale, self.trainable, self.reference
        )
        self.graphdef = split_model(nnx.eval_shape(build), self.trainable)[0]
        abstract_state = jax.eval_shape(self._init)
        # The unadapted model's parameters: what `init_state(base)` takes.
        self.base_shardings = tree_shardings(
            nnx.state(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))), nnx.Param),
            self.mesh,
            "params",
            cfg.mesh.zero_stage,
        )
        zero = cfg.mesh.zero_stage
        self.shardings = train_state_shardings(abstract_state, self.mesh, zero)
        self.grad_shardings = tree_shardings(abstract_state.params, self.mesh, "grads", zero)
        self.batch_sharding = batch_sharding(self.mesh)
        self.rows = local_rows(self.batch_sharding, tc.batch_size)  # this process's rows of each batch
        self.objective, self.loss = None, None
        losses = dict(reward=make_reward_loss, dpo=make_dpo_loss, ppo=make_ppo_loss, grpo=make_grpo_loss)
        if tc.objective in losses:
            self.loss = losses[tc.objective](cfg.align)
        else:
            self.objective = make_objective(
                tc.objective, mask_id=mask_id, vocab_size=cfg.model.vocab_size, rate=tc.mask_rate, layer_runner=runner
            )
        step = make_train_step(
            self.graphdef,
            self.tx,
            grad_accum=tc.grad_accum,
            z_loss=tc.z_loss,
            grad_shardings=self.grad_shardings,
            objective=self.objective,
            loss=self.loss,
            reference=self.reference,
            dropout=cfg.model.drops or (cfg.peft.method in ("lora", "qlora") and cfg.peft.dropout > 0),
            loss_scale_window=tc.loss_scale_window if self.scaling else None,
        )
        self.train_step = jax.jit(
            on_mesh(step, self.mesh),
            in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=(self.shardings, replicated(self.mesh)),
            donate_argnums=0,
        )

    def describe(self) -> str:
        return f"mesh {describe(self.sizes)} on {self.mesh.size} devices, zero_stage {self.cfg.mesh.zero_stage}"

    def init_state(self, base=None) -> TrainState:
        """A fresh state, created already sharded: a large model never sits whole on one device.

        base: the starting weights (an nnx.State of the model's Params, host or device arrays), e.g. from
        `finetune.init_from`; they enter sharded, and a PEFT method's adapters (and NF4 quantization) are
        built on them inside the same compiled function. None: a random initialisation.
        """
        if base is None:
            return jax.jit(self._init, out_shardings=self.shardings)()
        base = jax.device_put(base, self.base_shardings)
        return jax.jit(self._init, out_shardings=self.shardings)(base)

    def restore_state(
        self, state: TrainState, params, opt_state, step: int, rng, loss_scale: dict | None = None
    ) -> TrainState:
        """`state` (from `init_state`, which provides the frozen part) with a checkpoint's trained part.

        loss_scale: {"scale", "good_steps", "skipped"} as saved (default: a fresh one)."""
        put = lambda x, s: jax.device_put(x, s)  # noqa: E731
        if loss_scale is None:
            fresh = self.cfg.train.loss_scale if self.scaling else 1.0
            loss_scale = {"scale": fresh, "good_steps": 0, "skipped": 0}
        scale = LossScale.create(loss_scale["scale"], loss_scale["good_steps"], loss_scale["skipped"])
        return TrainState(
            put(jnp.asarray(step, jnp.int32), self.shardings.step),
            params,
            opt_state,
            put(jnp.asarray(np.asarray(rng), jnp.uint32), self.shardings.rng),
            jax.tree.map(put, scale, self.shardings.loss_scale),
            state.frozen,
            state.ref,
        )

    def place_weights(self, model, ref=None) -> tuple:
        """A trained model's weights as `eval_step` takes them, sharded: (params, frozen, ref).

        ref: the reference parameters when `reference == "copy"` (DPO's starting model), else None."""
        _, params, frozen = split_model(model, self.trainable)
        ref = nnx.State({}) if ref is None else ref
        return jax.device_put((params, frozen, ref), (self.shardings.params, self.shardings.frozen, self.shardings.ref))

    def eval_step(self, token_bytes: np.ndarray):
        # Ids above the tokenizer's vocabulary (T5 sentinels) stand for no text: 0 bytes.
        token_bytes = np.pad(token_bytes, (0, max(0, self.cfg.model.vocab_size - len(token_bytes))))
        step = make_eval_step(
            self.graphdef, jnp.asarray(token_bytes), self.objective, loss=self.loss, reference=self.reference
        )
        return jax.jit(
            on_mesh(step, self.mesh),
            in_shardings=(self.shardings.params, self.shardings.frozen, self.shardings.ref, self.batch_sharding),
            out_shardings=replicated(self.mesh),
        )

    def put_batch(self, rows: dict[str, np.ndarray], lo: int | None = None) -> dict:
        """Host rows [lo, lo + n) of a global batch (default: this process's rows) -> sharded arrays."""
        return to_global(rows, self.batch_sharding, self.cfg.train.batch_size, self.rows[0] if lo is None else lo)
