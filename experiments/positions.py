"""Do RoPE and ALiBi extrapolate to longer contexts than learned positions?

Trains one model shape five ways at context 128 — learned, sinusoidal, RoPE, ALiBi and T5's relative bias —
with the same data, steps and seed, then measures held-out perplexity on the same tokens cut into sequences
of 128, 256, 512 and 1024. The RoPE model is also evaluated with its frequencies rescaled at evaluation
time, without further training: linear (position interpolation), dynamic NTK and YaRN, each with the
factor evaluation length / 128.

    python experiments/positions.py [--quick] [--steps 400]

Runs go under runs/gallery/positions/ (not committed). Writes experiments/results/positions.json and .png.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, save, train_variant, training_args  # noqa: E402

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "relative"]
# Sinusoids of amplitude 1 would drown token embeddings initialised at std 0.02: like Vaswani et al., the
# sinusoidal model scales its embeddings by sqrt(d_model).
EXTRA = {"sinusoidal": ["model.embed_scale=true"]}
SCALINGS = ["linear", "dynamic", "yarn"]  # applied to the RoPE model at evaluation
MULTIPLES = [1, 2, 4, 8]  # evaluation lengths, in training contexts


def perplexity(model, tokens, length: int) -> float:
    """exp(mean next-token loss) over `tokens` cut into rows of `length`: every length scores the same tokens."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxlm.ops.losses import cross_entropy

    @nnx.jit
    def loss(model, inputs, targets):
        logits, _ = model(inputs)
        return cross_entropy(logits, targets)

    rows = (len(tokens) - 1) // length
    inputs = np.asarray(tokens[: rows * length]).reshape(rows, length)
    targets = np.asarray(tokens[1 : rows * length + 1]).reshape(rows, length)
    total, count = 0.0, 0.0
    chunk = max(1, 8192 // length)  # a forward pass of 8k tokens at a time
    for i in range(0, rows, chunk):
        s, n = loss(model, jnp.asarray(inputs[i : i + chunk]), jnp.asarray(targets[i : i + chunk]))
        total, count = total + float(s), count + float(n)
    return float(np.exp(total / count))


def with_model_config(model, **changes):
    """The same parameters under a model config with `changes` (RoPE scaling is computed, not stored)."""
    from flax import nnx

    from jaxlm.nn.models import build_model

    cfg = dataclasses.replace(model.cfg, **changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return nnx.merge(graphdef, nnx.state(model, nnx.Param))


def main(argv=None):
    args = training_args(__doc__, "positions", steps=400, argv=argv)
    started = time.perf_counter()

    import numpy as np

    from jaxlm.data.corpus import load_corpus
    from jaxlm.data.loader import pack_documents
    from jaxlm.train.run_dir import load_run

    steps = 3 if args.quick else args.steps
    context = 32 if args.quick else 128
    lengths = [context * m for m in MULTIPLES]
    eval_tokens = lengths[-1] * (2 if args.quick else 16)  # the same tokens at every length
    rows, scaled = [], {}
    for position in POSITIONS:
        run = Path(args.root) / position
        overrides = [f"model.position={position}", f"data.seq_len={context}", *EXTRA.get(position, [])]
        trained = train_variant(run, overrides + [f"model.max_seq_len={lengths[-1]}"], steps=steps, quick=args.quick)
        cfg, tokenizer, model, _ = load_run(run)
        assert cfg.model.max_seq_len == lengths[-1] and cfg.data.seq_len == context
        _, val = load_corpus(cfg.data.source, cfg.data.val_fraction)
        tokens = pack_documents(tokenizer.encode_batch(val), tokenizer.eos_id)[: eval_tokens + 1]
        ppl = {n: round(perplexity(model, tokens, n), 3) for n in lengths}
        trained.pop("config")
        rows.append({"position": position, "perplexity": ppl, **trained})
        if position == "learned":  # the rows past the training length never get a gradient, only weight decay
            table = np.asarray(model.stack.positions.embedding[...])
            rms = lambda rows: float(np.sqrt(np.mean(rows**2)))  # noqa: E731
            rows[-1]["position_rms_trained"] = round(rms(table[:context]), 5)
            rows[-1]["position_rms_untrained"] = round(rms(table[context:]), 5)
        print(position, ppl, flush=True)
        if position == "rope":
            for scaling in SCALINGS:
                scaled[scaling] = {}
                for n in lengths:
                    extra = {"rope_original_max_len": context} if scaling != "linear" else {}
                    # dynamic NTK grows the base with the current length by itself: its factor stays 1
                    factor = 1.0 if scaling == "dynamic" else n / context
                    m = with_model_config(model, rope_scaling=scaling, rope_factor=factor, **extra)
                    scaled[scaling][n] = round(perplexity(m, tokens, n), 3)
                print("rope +", scaling, scaled[scaling], flush=True)

    longest = lengths[-1]
    by = {r["position"]: r["perplexity"] for r in rows}
    parts = [f"{name} {by[name][context]:.1f} -> {by[name][longest]:.1f}" for name in POSITIONS]
    parts += [f"rope+{s} {scaled[s][context]:.1f} -> {scaled[s][longest]:.1f}" for s in SCALINGS]
    summary = f"held-out perplexity at {context} -> {longest} tokens (trained at {context}): " + ", ".join(parts)
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in POSITIONS:
        axes[0].plot(lengths, [by[name][n] for n in lengths], "o-", label=name)
    axes[0].set(title=f"trained at {context} tokens", ylabel="held-out perplexity")
    axes[1].plot(lengths, [by["rope"][n] for n in lengths], "o-", color="tab:green", label="rope (no scaling)")
    for s in SCALINGS:
        axes[1].plot(lengths, [scaled[s][n] for n in lengths], "s--", label=f"rope + {s}")
    axes[1].set(title="RoPE rescaled at evaluation")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("evaluation length (tokens)")
        ax.axvline(context, color="gray", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    fig.tight_layout()
    result = {"steps": steps, "context": context, "lengths": lengths, "eval_tokens": eval_tokens, "rows": rows}
    save(Path(args.out), {**result, "rope_scaled": scaled, "summary": summary}, fig, started=started)


if __name__ == "__main__":
    main()
