"""Batch generation with a KV cache, for decoders and encoder-decoders alike: every prompt of a batch in its
own slot of a continuous-batching `Engine` (see `jaxlm.engine`), so a batch generates exactly what each
prompt would generate alone, also past the context refill.

The model speaks a two-method protocol: `init_cache(batch, length, **context)` (an encoder-decoder encodes
its `source` there, once) and `decode(tokens, positions, valid, cache=, cache_index=)`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.engine import DecodeSteps, Engine, Request, check_sampling
from jaxlm.engine.steps import bucket

__all__ = ["Generator", "check_sampling", "generate_uncached"]


class Generator:
    def __init__(
        self,
        model,
        *,
        window_shift: int | None = None,
        prefix_lm: bool = False,
        chunk: int = 128,
        draft=None,
        draft_tokens: int = 4,
    ):
        """model: a `TransformerLM` (causal) or an `EncoderDecoderLM`.

        window_shift: tokens dropped when a row's cache is full (default max_seq_len // 4).
        prefix_lm: the prompt attends to itself bidirectionally (a model trained with train.objective=prefix_lm).
        chunk: prompt tokens prefilled per step (prompts up to this length take one prefill).
        draft, draft_tokens: speculative decoding with a draft model or "ngram" (see `DecodeSteps`): the same
          greedy output, the same distribution when sampling, fewer model steps.
        """
        self.steps = DecodeSteps(model, prefix_lm=prefix_lm, draft=draft, draft_tokens=draft_tokens)
        self.stats = {}
        self.window_shift, self.chunk = window_shift, chunk
        self.max_len = self.steps.max_len
        ws = window_shift or max(1, self.max_len // 4)
        if not 1 <= ws < self.max_len:
            raise ValueError(f"window_shift must be in [1, {self.max_len}), got {ws}")

    @property
    def params(self):
        return self.steps.params

    @params.setter
    def params(self, params):  # new weights of the same model: no recompilation
        self.steps.params = params

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Iterable[int] = (),
        sources: list[list[int]] | None = None,
        with_stop: bool = False,
    ) -> list[list[int]]:
        """New tokens for each prompt, up to a token of `stop_ids` (`jaxlm.data.chat.stop_ids(tokenizer)`; the
        stop token is left out, or ends the row with `with_stop`) or `max_new_tokens` (stop token included).

        Row b samples with seed `seed` and stream b (`jaxlm.engine`), whatever the other rows are.

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
        longest = max(len(p) for p in prompts)
        chunk = min(self.chunk, max(8, bucket(longest)))  # 8, 12, 16, 24, ...: a third padding at most
        engine = Engine(
            self.steps,
            slots=len(prompts),
            chunk=chunk,
            window_shift=self.window_shift,
            context=context or None,
            shrink=False,  # one batch: compile one row count
            kv_blocks=self._blocks(prompts, max_new_tokens),
        )
        stops = frozenset(int(i) for i in stop_ids)
        requests = [
            engine.submit(
                Request(
                    list(p),
                    max_new_tokens,
                    temperature=float(temperature),
                    top_k=int(top_k),
                    top_p=float(top_p),
                    seed=seed,
                    stream=b,
                    stop_ids=stops,
                )
            )
            for b, p in enumerate(prompts)
        ]
        engine.run()
        self.stats = engine.stats
        return [r.tokens + [r.stop_token] if with_stop and r.stop_token is not None else r.tokens for r in requests]

    def _blocks(self, prompts, max_new_tokens: int) -> int:
        """The KV pool of one batch: the blocks its rows may hold, rounded up to a power of two (few shapes)."""
        st, S = self.steps, self.max_len
        W = S - (self.window_shift or max(1, S // 4))
        need = sum(min(st.row_blocks, -(-(min(len(p[-W:]) + max_new_tokens, S) + st.virtual) // st.Z)) for p in prompts)
        return min(len(prompts) * st.row_blocks, max(st.row_blocks, 1 << (need - 1).bit_length()))

    def _context(self, sources, rows: int) -> dict:
        """init_cache's keyword arguments: the right-padded sources and their mask (encoder-decoders)."""
        if not self.steps.seq2seq:
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
