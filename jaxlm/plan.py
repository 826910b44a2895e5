"""`jaxlm plan`: how a config's training state splits over a mesh, without allocating anything.

Shapes come from `jax.eval_shape`; shardings from the same rules the trainer
uses; bytes per device are each array's bytes over its shard count. Activation
memory is an estimate of what the backward pass keeps per device (the largest
term of each layer; see `activation_bytes`), not a measurement.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from jaxlm.axes import logical_to_spec, rules_for
from jaxlm.config import Config, ConfigError
from jaxlm.nn.models import active_params, build_model
from jaxlm.nn.param import dtype_of
from jaxlm.parallel.mesh import check_layout, describe

GiB = 1024**3


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _shards(spec, sizes: dict[str, int]) -> int:
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            n *= sizes[axis]
    return n


def activation_bytes(cfg: Config, sizes: dict[str, int], microbatches: int) -> float:
    """Estimated activation bytes one device keeps for the backward pass of one micro-batch.

    Per layer and token, remat=none keeps the block's inputs, norms, q/k/v (and
    their batch-major copies), attention scores and probabilities, MLP hidden states and outputs; save_dots keeps the
    projection outputs only; full keeps the layer input (plus one layer's worth
    during its recomputation). Head and MLP terms split over `tensor`, tokens over `context`. Blockwise
    attention keeps no scores (only each row's log-sum-exp), and a chunked read-out (`model.logits_chunk`)
    keeps one chunk's logits.
    """
    m, tc = cfg.model, cfg.train
    a = jax.numpy.dtype(dtype_of(m.dtype)).itemsize
    rows = tc.batch_size // tc.grad_accum // (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    T, D, F, N, K, H = cfg.data.seq_len, m.d_model, m.mlp_dim, m.num_heads, m.kv_heads, m.dim_per_head
    C = sizes.get("context", 1)
    S, T = T, T / C  # a device's queries are T/C tokens; they see keys of the whole sequence
    if m.num_experts:  # a token's k experts (and the shared ones) hold its hidden states
        F = (m.experts_per_token + m.shared_experts) * m.expert_hidden
    tp = sizes["tensor"]
    k_tp = tp if K % tp == 0 else 1
    gated = 2 if m.mlp == "gated" else 1
    span = min(S, m.sliding_window) if m.sliding_window else S
    # Scores and probabilities (N, T, S) are materialised except by the fused cuDNN kernel and blockwise
    # attention, which keep each row's log-sum-exp (float32).
    tiled = m.attention_impl in ("cudnn", "blockwise")
    scores = N / tp * T * 4 / a if tiled else 2 * N / tp * T * span
    # q, k, v, their batch-major copies for the attention GEMMs and the attention output; MLP hidden states
    # (gated: gate, up, act(gate), product; plain: pre- and post-activation).
    full_layer = T * (6 * D + (N * H) / tp * 3 + 4 * K * H / k_tp + 2 * gated * F / tp) + scores
    dots = T * (N * H / tp + 2 * K * H / k_tp + D + gated * F / tp + D)
    per_layer = {"none": full_layer, "save_dots": dots, "full": T * D}[m.remat]
    layers = m.num_layers // sizes["pipeline"]
    extra = full_layer if m.remat != "none" else 0  # the layer being recomputed
    read = min(m.logits_chunk or S, S) / C  # positions whose logits are alive at once
    logits = 2 * read * m.vocab_size / tp * 4  # float32 logits and their gradient
    # A pipeline stage keeps every micro-batch in flight: rows/microbatches each, all of them; with the
    # circular schedule each passes its L/P layers in R visits, which keeps the same activations.
    return rows * (a * (layers * per_layer + extra) + logits)


def expert_exchange(cfg: Config, sizes: dict[str, int]) -> str:
    """Expert parallelism's all-to-all traffic per device and train step (`jaxlm.parallel.experts`): each MoE
    layer sends a buffer of S rows to each of the P devices of the expert axis and gets the outputs back, in
    the forward pass and again (transposed) in the backward."""
    m, tc = cfg.model, cfg.train
    P_ = sizes["expert"]
    a = jax.numpy.dtype(dtype_of(m.dtype)).itemsize
    rows = tc.batch_size // tc.grad_accum // (sizes["data"] * sizes["fsdp"] * P_)
    assignments = rows * cfg.data.seq_len * m.experts_per_token
    S = assignments if not m.capacity_factor else math.ceil(m.capacity_factor * assignments / P_)
    per_exchange = P_ * S * (m.d_model * a + 4)  # the rows and their expert ids
    layers = m.num_layers + m.decoder_layers
    step = 4 * per_exchange * layers * tc.grad_accum  # forward out and back, backward out and back
    kind = (
        "dropless: worst-case buffers of every local assignment"
        if not m.capacity_factor
        else (f"capacity_factor {m.capacity_factor}")
    )
    return (
        f"expert parallelism: {m.num_experts // P_} of {m.num_experts} experts a device (expert={P_}); all-to-all "
        f"{_fmt_bytes(per_exchange)} a layer each way, {_fmt_bytes(step)} a step per device ({kind})"
    )


def context_exchange(cfg: Config, sizes: dict[str, int]) -> str:
    """Ring attention's traffic per device and train step (`jaxlm.parallel.context`): each attention layer
    passes its K/V shard C-1 times forward; the backward pass passes K/V C-1 times and their gradients (float32)
    C times."""
    m, tc = cfg.model, cfg.train
    C = sizes["context"]
    a = jax.numpy.dtype(dtype_of(m.dtype)).itemsize
    rows = tc.batch_size // tc.grad_accum // (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    width = m.kv_heads * (m.dim_per_head + m.mla_v_dim if m.kv_lora_rank else 2 * m.dim_per_head)
    shard = rows * cfg.data.seq_len / C * width * a
    step = shard * (2 * (C - 1) + C * 4 / a) * m.num_layers * tc.grad_accum
    return (
        f"context parallelism: {cfg.data.seq_len // C} tokens a device (context={C}, zig-zag); the ring passes "
        f"{_fmt_bytes(shard)} of K/V a layer a step, {_fmt_bytes(step)} a train step per device"
    )


def compiled_memory(cfg: Config) -> dict[str, int]:
    """Per-device bytes of the compiled train step (XLA's `memory_analysis`) on the devices present.

    Compiles, allocates nothing: arguments (state and batch), outputs, the part of the outputs that
    reuses donated arguments, temporaries (activations and workspace), and peak = arguments +
    outputs - aliased + temporaries.
    """
    import numpy as np

    from jaxlm.train.sharded import ShardedTraining

    sharded = ShardedTraining(cfg)
    state = jax.eval_shape(sharded._init)
    if cfg.train.objective != "clm":
        raise ConfigError(f"plan --compiled supports train.objective=clm, not {cfg.train.objective}")
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32)
    analysis = sharded.train_step.lower(state, {"inputs": tokens, "targets": tokens}).compile().memory_analysis()
    out = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _per_device(params, sizes: dict[str, int], zero: int, opt_copies: int):
    """Per-device bytes of parameters, gradients and optimizer state (totals), and per parameter
    (name, variable, logical axes, {kind: spec}, {kind: bytes})."""
    totals, table = {"params": 0.0, "grads": 0.0, "opt_state": 0.0}, []
    for path, v in nnx.to_flat_state(params):
        name = ".".join(str(p) for p in path)
        axes = v.get_metadata()["out_sharding"]
        nbytes = math.prod(v.shape) * jax.numpy.dtype(v.dtype).itemsize
        specs = {k: logical_to_spec(axes, v.shape, rules_for(k, zero), sizes, where=name) for k in totals}
        per = {k: nbytes / _shards(specs[k], sizes) for k in totals}
        per["opt_state"] *= opt_copies
        for k in totals:
            totals[k] += per[k]
        table.append((name, v, axes, specs, per))
    return totals, table


def memory_per_device(cfg: Config, num_devices: int) -> dict[str, float]:
    """`jaxlm plan`'s per-device estimate in bytes: params, grads, opt_state (AdamW), activations."""
    sizes = cfg.mesh.resolve(num_devices)
    microbatches = check_layout(cfg, sizes)
    model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
    totals, _ = _per_device(nnx.state(model, nnx.Param), sizes, cfg.mesh.zero_stage, 2)
    return {**totals, "activations": activation_bytes(cfg, sizes, microbatches)}


def plan(cfg: Config, num_devices: int | None = None, *, compiled: bool = False) -> str:
    """A report of every parameter's sharding and the per-device memory of training `cfg`.

    compiled: also compile the train step on the devices present and compare the estimate with
    XLA's own per-device figures (`compiled_memory`).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = cfg.mesh.resolve(num_devices)
    microbatches = check_layout(cfg, sizes)
    zero = cfg.mesh.zero_stage
    model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    opt_copies = 2  # AdamW: first and second moments, each the size of the parameters

    lines = []
    total = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(params))
    m = cfg.model
    lines.append(
        f"plan: {_fmt_count(total)} parameters ({m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads / "
        f"{m.kv_heads} kv, mlp {m.mlp_dim}, vocab {m.vocab_size}), {m.param_dtype} parameters, {m.dtype} compute"
    )
    if m.num_experts:
        expert = m.d_model * m.expert_hidden * (3 if m.mlp == "gated" else 2)  # weights (biases aside)
        stacks = [m.num_layers] + ([m.decoder_layers] if m.decoder_layers else [])
        expert_layers = sum(n - m.first_dense_layers for n in stacks)
        lines.append(
            f"experts: {m.num_experts} an expert layer, {m.experts_per_token} a token, each {_fmt_count(expert)} "
            f"parameters: {_fmt_count(expert * m.num_experts * expert_layers)} in experts; "
            f"{_fmt_count(active_params(m))} parameters active a token"
        )
    if m.num_experts and sizes["expert"] > 1:
        lines.append(expert_exchange(cfg, sizes))
    if sizes["context"] > 1:
        lines.append(context_exchange(cfg, sizes))
    lines.append(
        f"mesh: {describe(sizes)} = {math.prod(sizes.values())} devices, zero_stage {zero}, "
        f"batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens, grad_accum {cfg.train.grad_accum}, "
        f"remat {m.remat}"
        + (f", {microbatches} pipeline micro-batches" if sizes["pipeline"] > 1 else "")
        + (f", circular schedule with {cfg.mesh.pipeline_repeats} repeats" if cfg.mesh.pipeline_repeats > 1 else "")
    )
    lines.append("")
    rows = [("parameter", "shape", "logical axes", "parameters on", "optimizer state on", "params/device")]
    show = lambda s: "replicated" if all(e is None for e in s) else "(" + ", ".join(map(str, s)) + ")"  # noqa: E731
    totals, table = _per_device(params, sizes, zero, opt_copies)
    for name, v, axes, specs, per in table:
        shape = "(" + ", ".join(map(str, v.shape)) + ")"
        rows.append(
            (
                name,
                shape,
                ", ".join(str(a) for a in axes),
                show(specs["params"]),
                show(specs["opt_state"]),
                _fmt_bytes(per["params"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    act = activation_bytes(cfg, sizes, microbatches)
    lines.append("")
    lines.append("memory per device")
    lines.append(f"  parameters        {_fmt_bytes(totals['params']):>12}")
    lines.append(f"  gradients         {_fmt_bytes(totals['grads']):>12}")
    lines.append(f"  optimizer state   {_fmt_bytes(totals['opt_state']):>12}   (AdamW moments)")
    lines.append(f"  activations       {_fmt_bytes(act):>12}   (estimate, remat={m.remat})")
    estimate = sum(totals.values()) + act
    lines.append(f"  total             {_fmt_bytes(estimate):>12}")
    if compiled:
        if math.prod(sizes.values()) > jax.device_count():
            raise ConfigError(
                f"plan --compiled compiles on the devices present ({jax.device_count()}); this mesh needs "
                f"{math.prod(sizes.values())}"
            )
        mem = compiled_memory(cfg)
        state = totals["params"] + totals["opt_state"]
        lines.append("")
        lines.append("compiled train step (XLA memory analysis, per device)")
        lines.append(
            f"  arguments         {_fmt_bytes(mem['arguments']):>12}   (state and batch; estimate {_fmt_bytes(state)})"
        )
        lines.append(f"  temporaries       {_fmt_bytes(mem['temporaries']):>12}   (gradients, activations, workspace)")
        lines.append(
            f"  outputs           {_fmt_bytes(mem['outputs']):>12}   ({_fmt_bytes(mem['aliased'])} reuse donated arguments)"
        )
        lines.append(f"  peak              {_fmt_bytes(mem['peak']):>12}")
        diff = (estimate - mem["peak"]) / mem["peak"]
        lines.append(
            f"  estimate - peak   {_fmt_bytes(abs(estimate - mem['peak'])):>12}   ({diff:+.0%} of the compiled peak)"
        )
    return "\n".join(lines)
