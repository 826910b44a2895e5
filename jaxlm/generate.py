"""Autoregressive generation with a fixed-size KV cache, for decoders and encoder-decoders alike.

The model speaks a two-method protocol: `init_cache(batch, length, **context)`
(an encoder-decoder encodes its `source` there, once) and
`decode(tokens, positions, valid, cache=, cache_index=)`. One jit-compiled
prefill runs the whole (left-padded) prompt batch at once; then one
jit-compiled decode step per token writes one slot of the cache and samples the
next token, with no recompilation per token. Prompts of different lengths
share the cache: shorter ones are left-padded, padding slots are never attended
to, and positions count from each prompt's first real token. Step i samples
with `fold_in(PRNGKey(seed), i)`.

When the cache (model.max_seq_len slots) is full, the oldest tokens are
dropped: the last `max_seq_len - window_shift` tokens are prefilled again as a
fresh context (positions restart at 0), so generation never fails for length
and learned position tables are never indexed out of range.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.ops.sampling import sample


class Generator:
    def __init__(self, model, *, window_shift: int | None = None, prefix_lm: bool = False):
        """model: a `TransformerLM` (causal) or an `EncoderDecoderLM`.

        prefix_lm: the prompt attends to itself bidirectionally (a model trained with train.objective=prefix_lm).
        """
        if not model.cfg.causal:
            raise ConfigError(
                "a bidirectional model (model.causal=false, e.g. BERT) cannot generate text left to right"
            )
        self.seq2seq = bool(model.cfg.decoder_layers)
        if prefix_lm and self.seq2seq:
            raise ConfigError("prefix_lm generation is for decoder-only models")
        self.prefix_lm = prefix_lm
        self.graphdef, self.params = nnx.split(model)
        self.max_len = model.cfg.max_seq_len
        self.window_shift = window_shift or max(1, self.max_len // 4)
        if not 1 <= self.window_shift < self.max_len:
            raise ValueError(f"window_shift must be in [1, {self.max_len}), got {self.window_shift}")
        sampling = ("temperature", "top_k", "top_p")
        self._prefill = jax.jit(self._prefill_fn, static_argnames=sampling)
        self._decode = jax.jit(self._decode_fn, static_argnames=sampling, donate_argnums=1)

    def _prefill_fn(self, params, tokens, positions, valid, key, context, prefix=None, **sampling):
        model = nnx.merge(self.graphdef, params)
        cache = model.init_cache(tokens.shape[0], self.max_len, **context)
        if prefix is None:
            logits, cache = model.decode(tokens, positions, valid, cache=cache, cache_index=0)
        else:
            logits, cache = model(tokens, positions, valid, cache=cache, cache_index=0, prefix=prefix)
        return sample(key, logits[:, -1], **sampling), cache

    def _decode_fn(self, params, cache, token, position, index, key, **sampling):
        model = nnx.merge(self.graphdef, params)
        logits, cache = model.decode(token[:, None], position[:, None], cache=cache, cache_index=index)
        return sample(key, logits[:, 0], **sampling), cache

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_id: int | None = None,
        sources: list[list[int]] | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt, stopping at `eos_id` (excluded) or `max_new_tokens`.

        Args:
          prompts: token ids per prompt; each needs at least one token. For an encoder-decoder these are
            the decoder's first inputs (usually `[[start_id]] * len(sources)`).
          sources: encoder-decoders only: the source token ids of each row (right-padded into one batch).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (use the end-of-text id to start from nothing)")
        check_sampling(temperature, top_k, top_p)
        context = self._context(sources, len(prompts))
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        S, W = self.max_len, self.max_len - self.window_shift
        prompts = [list(p)[-W:] for p in prompts]  # longer prompts keep their most recent tokens
        B, P = len(prompts), max(len(p) for p in prompts)
        hist = np.zeros((B, P + max_new_tokens), np.int32)
        pads = np.array([P - len(p) for p in prompts])
        for b, p in enumerate(prompts):
            hist[b, pads[b] : P] = p
        key = jax.random.PRNGKey(seed)

        def prefill(w0: int, t: int, step: int):
            """Fresh cache from hist[:, w0 : t + 1]; returns next token, cache and position offsets."""
            cols = np.arange(w0, t + 1)
            offset = np.maximum(pads, w0)  # hist index that gets position 0 in this window
            valid = cols[None, :] >= pads[:, None]
            positions = np.maximum(cols[None, :] - offset[:, None], 0).astype(np.int32)
            prefix = valid if self.prefix_lm and w0 == 0 else None  # the prompt, bidirectional
            tok, cache = self._prefill(
                self.params,
                hist[:, w0 : t + 1],
                positions,
                valid,
                jax.random.fold_in(key, step),
                context,
                prefix,
                **sampling,
            )
            return tok, cache, offset

        tok, cache, offset = prefill(0, P - 1, 0)
        index, generated, done = P, [], np.zeros(B, bool)
        for i in range(max_new_tokens):
            generated.append(tok)
            t = P + i  # hist index of `tok`
            if eos_id is not None and (i % 16 == 15 or i == max_new_tokens - 1):
                done |= np.any(np.stack(jax.device_get(generated[-16:])) == eos_id, axis=0)
                if done.all():
                    break
            if i == max_new_tokens - 1:
                break
            if index == S:  # cache full: keep the last W tokens as a fresh context
                hist[:, P : t + 1] = np.stack(jax.device_get(generated), axis=1)
                tok, cache, offset = prefill(t - W + 1, t, i + 1)
                index = W
            else:
                position = jnp.asarray(t - offset, jnp.int32)
                tok, cache = self._decode(
                    self.params, cache, tok, position, index, jax.random.fold_in(key, i + 1), **sampling
                )
                index += 1
        out = np.stack(jax.device_get(generated), axis=1)
        return [_until(row.tolist(), eos_id) for row in out]

    def _context(self, sources, rows: int) -> dict:
        """init_cache's keyword arguments: the right-padded sources and their mask (encoder-decoders)."""
        if not self.seq2seq:
            if sources is not None:
                raise ValueError("sources are for encoder-decoder models; this model is a decoder")
            return {}
        if sources is None or len(sources) != rows or any(len(s) == 0 for s in sources):
            raise ValueError(f"an encoder-decoder needs one non-empty source per prompt ({rows} prompts)")
        src = np.zeros((rows, max(len(s) for s in sources)), np.int32)
        valid = np.zeros(src.shape, bool)
        for i, s in enumerate(sources):
            src[i, : len(s)], valid[i, : len(s)] = s, True
        return {"source": src, "source_valid": valid}


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the bad sampling setting, before anything is traced."""
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def _until(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def generate_uncached(model, prompt: list[int], *, max_new_tokens: int, window_shift: int | None = None) -> list[int]:
    """Greedy reference without a cache: the whole context is recomputed for every token.

    Same context rule as `Generator`: at most max_seq_len tokens; when that
    overflows, the last max_seq_len - window_shift tokens become the context.
    The input is right-padded to max_seq_len so one compilation serves all steps.
    """
    S = model.cfg.max_seq_len
    W = S - (window_shift or max(1, S // 4))
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit)
    def next_token(params, tokens, length):
        m = nnx.merge(graphdef, params)
        logits, _ = m(tokens[None])
        return jnp.argmax(logits[0, length - 1]).astype(jnp.int32)

    seq = list(prompt)[-W:]
    start, out = 0, []
    for _ in range(max_new_tokens):
        if len(seq) - start > S:
            start = len(seq) - W
        ctx = np.zeros(S, np.int32)
        ctx[: len(seq) - start] = seq[start:]
        tok = int(next_token(params, ctx, len(seq) - start))
        out.append(tok)
        seq.append(tok)
    return out
