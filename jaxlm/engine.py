"""Continuous batching: a fixed number of cache slots that requests join and leave between decode steps.

Every slot (cache row) is one sequence with its own length and positions: a row's tokens are written at its
own cache index (`jaxlm.ops.cache.write_rows`), so no row ever loses context because of another, and a
batch generates exactly what each prompt would generate alone. Two compiled steps serve every mix of
requests, with no recompilation as they come and go:

- prefill (P, C): the next chunk of C prompt tokens of the P slots that are filling, gathered from the
  cache and written back, so a long prompt is prefilled in chunks and decoding rows wait at most one chunk;
- decode (n, 1): one token for every decoding slot, on the first n cache rows (those that hold requests:
  a request takes the lowest free slot).

P and n are powers of two up to N (`shrink`), each compiled once (`Engine.warm_up` compiles them all).

A request leaves on a stop token, at its token limit, or when cancelled; its slot is free at the next step.
Sampling settings and seeds are per request: the i-th token of a request is drawn with
`fold_in(fold_in(PRNGKey(seed), stream), i)`, whatever else is in the batch.

When a row's cache is full (max_seq_len slots), its last `max_seq_len - window_shift` tokens are prefilled
again as a fresh context (positions restart at 0), so generation never fails for length and learned
position tables are never indexed out of range; the other rows are not affected.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.ops.sampling import distribution, sample
from jaxlm.ops.speculative import speculative_accept


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to continue. The engine fills `tokens` (generated, stop token excluded) and, when the
    request leaves, `finish_reason`: "stop" (a stop token, kept in `stop_token`), "length" or "cancelled"."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0  # a second seed: the rows of one call, the choices of one HTTP request
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_token: int | None = None
    prompt_tokens: int = 0  # the prompt tokens kept (a prompt longer than the window keeps its end)
    admitted: bool = False  # has had a slot

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the bad sampling setting, before anything is traced."""
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


class DecodeSteps:
    """The compiled prefill, decode and speculative steps of one model, shared by every engine over it.

    `params` may be replaced by new weights of the same model (RL rollouts) without recompiling. The cache
    an engine holds is a pair (the model's, the draft model's or None).
    """

    def __init__(self, model, *, prefix_lm: bool = False, draft=None, draft_tokens: int = 4):
        """model: a `TransformerLM` (causal) or an `EncoderDecoderLM`.

        prefix_lm: the prompt attends to itself bidirectionally (a model trained with train.objective=prefix_lm).
        draft: speculative decoding: a smaller causal model over the same vocabulary, "ngram" (prompt lookup:
          drafts copied from where the context's last tokens occurred before), or None.
        draft_tokens: K, tokens drafted per step.
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
        self.virtual = 0 if self.seq2seq else model.virtual_tokens  # prompt/prefix tuning's leading slots
        self.draft, self.K = draft, int(draft_tokens)
        self.draft_graphdef = self.draft_params = None
        if draft is not None:
            if self.seq2seq or prefix_lm:
                raise ConfigError("speculative decoding is for decoder-only models (not prefix LMs)")
            if not 1 <= self.K < self.max_len // 2:
                raise ConfigError(f"draft_tokens must be in [1, {self.max_len // 2}), got {draft_tokens}")
            if draft != "ngram":
                d = draft.cfg
                if d.decoder_layers or not d.causal or d.head != "lm":
                    raise ConfigError("a draft model must be a causal language model (decoder-only)")
                if d.vocab_size != model.cfg.vocab_size:
                    raise ConfigError(
                        f"the draft's vocabulary ({d.vocab_size}) differs from the model's ({model.cfg.vocab_size})"
                    )
                if d.max_seq_len < self.max_len:
                    raise ConfigError(
                        f"the draft's max_seq_len ({d.max_seq_len}) is below the model's ({self.max_len})"
                    )
                self.draft_graphdef, self.draft_params = nnx.split(draft)
        init_cache = jax.jit(self._init_cache_fn, static_argnums=2)
        # Caches and token arrays live where the parameters do (a restored run's are committed to a mesh), so
        # that the first step sees the same kinds of arrays as every later one: one compilation each.
        self.placement = None
        leaf = next((x for x in jax.tree.leaves(self.params) if isinstance(x, jax.Array)), None)
        if leaf is not None and leaf.sharding.is_fully_replicated:
            sharding = leaf.sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())  # any rank
            self.placement = sharding
        self.init_cache = lambda *a: self.place(init_cache(*a))
        # Each runs on the first n cache rows (n static: a few powers of two), so that a server with many
        # slots and few requests computes few rows.
        on_rows = lambda fn: jax.jit(functools.partial(_first_rows, fn), static_argnames="n", donate_argnums=2)  # noqa: E731
        # A prefill runs on the rows it fills, gathered (few, while many others decode).
        self.prefill = jax.jit(functools.partial(_gathered_rows, self._step_fn), donate_argnums=2)
        self.decode = on_rows(self._step_fn)  # the same function at T = 1, compiled apart
        self.speculate = on_rows(self._speculate_fn)

    def place(self, tree):
        return tree if self.placement is None else jax.device_put(tree, self.placement)

    def _init_cache_fn(self, params, draft_params, batch: int, context: dict):
        cache = nnx.merge(self.graphdef, params).init_cache(batch, self.max_len, **context)
        if self.draft_graphdef is None:
            return cache, None
        return cache, nnx.merge(self.draft_graphdef, draft_params).init_cache(batch, self.max_len)

    def _step_fn(self, params, draft_params, caches, prev, cols, rows, floats):
        """Writes each row's T tokens at its `index` (into the draft's cache too) and samples after its token
        `last`; the inputs are packed by `_Inputs` (tokens, positions, valid, prefix: (N, T); index, last:
        (N,); fresh: rows whose old context is dropped first; sampling settings). prev: (N,) the tokens of
        the step before, still on the device, which replace tokens[:, 0] where `from_prev`.
        Returns the (N,) sampled tokens and the caches.
        """
        x = _Inputs.unpack(cols, rows, floats)
        tokens, positions, valid, index = x["tokens"], x["positions"], x["valid"], x["index"]
        tokens = tokens.at[:, 0].set(jnp.where(x["from_prev"], prev[: tokens.shape[0]], tokens[:, 0]))
        cache, draft_cache = caches
        model = nnx.merge(self.graphdef, params)
        cache = _forget(cache, x["fresh"], self.virtual)
        if self.prefix_lm:
            logits, cache = model(tokens, positions, valid, cache=cache, cache_index=index, prefix=x["prefix"])
        else:
            logits, cache = model.decode(tokens, positions, valid, cache=cache, cache_index=index)
        if draft_cache is not None:
            draft = nnx.merge(self.draft_graphdef, draft_params)
            draft_cache = _forget(draft_cache, x["fresh"], draft.virtual_tokens)
            _, draft_cache = draft.decode(tokens, positions, valid, cache=draft_cache, cache_index=index)
        logits = jnp.take_along_axis(logits, x["last"][:, None, None], axis=1)[:, 0]
        keys = jax.vmap(_request_key)(x["seed"], x["stream"], x["count"])
        token = sample(keys, logits, temperature=x["temperature"], top_k=x["top_k"], top_p=x["top_p"])
        return token, (cache, draft_cache)

    def _speculate_fn(self, params, draft_params, caches, drafts, rows, floats):
        """One speculative step per row: K drafts (from the draft model, or `drafts` (N, K) given), verified by
        the model in one pass over K + 1 tokens; see `speculative_accept`.

        Packed by `_Inputs`: feed, position, index: (N,) the token to write next, its position and slot;
        limit: (N,) drafts that may be kept (0 for rows not decoding, whose index is past the end); sampling
        settings. Returns (N, K + 1) tokens (the kept drafts, then the next token), (N,) kept counts and the
        caches, in which the rejected drafts are forgotten.
        """
        x = _Inputs.unpack(None, rows, floats)
        feed, position, index, limit = x["feed"], x["position"], x["index"], x["limit"]
        cache, draft_cache = caches
        K, N = self.K, feed.shape[0]
        keys = jax.vmap(_request_key)(x["seed"], x["stream"], x["count"])
        settings = {k: x[k] for k in ("temperature", "top_k", "top_p")}
        valid = jnp.ones((N, 1), bool)
        if draft_cache is not None:  # K + 1 draft steps: the last writes the K-th draft (kept, it is the context)
            draft = nnx.merge(self.draft_graphdef, draft_params)

            def draft_step(carry, j):
                tok, dcache = carry
                logits, dcache = draft.decode(
                    tok[:, None], (position + j)[:, None], valid, cache=dcache, cache_index=index + j
                )
                q = distribution(logits[:, 0], **settings)
                step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2 + j))(keys)
                nxt = jax.vmap(lambda k, d: jax.random.categorical(k, jnp.log(d)))(step_keys, q).astype(jnp.int32)
                return (nxt, dcache), (nxt, q)

            (_, draft_cache), (drafts, q) = jax.lax.scan(draft_step, (feed, draft_cache), jnp.arange(K + 1))
            drafts, q = drafts[:K].T, q[:K].transpose(1, 0, 2)  # (N, K), (N, K, V)
        tokens = jnp.concatenate([feed[:, None], drafts], axis=1)
        positions = position[:, None] + jnp.arange(K + 1)[None]
        model = nnx.merge(self.graphdef, params)
        logits, cache = model.decode(tokens, positions, jnp.ones_like(tokens, bool), cache=cache, cache_index=index)
        V = logits.shape[-1]
        flat = {k: jnp.repeat(v, K + 1) for k, v in settings.items()}
        p = distribution(logits.reshape(N * (K + 1), V), **flat).reshape(N, K + 1, V)
        if draft_cache is None:
            q = jax.nn.one_hot(drafts, V, dtype=jnp.float32)
        kept, nxt = speculative_accept(keys, drafts, q, p, limit)
        out = jnp.concatenate([drafts, jnp.zeros((N, 1), jnp.int32)], axis=1)
        out = jnp.where(jnp.arange(K + 1)[None] == kept[:, None], nxt[:, None], out)
        # Slots index + kept + 1 .. index + K hold rejected drafts: forget them in both caches.
        slots = jnp.arange(cache["pos"].shape[1])[None]
        rejected = (slots >= (index + kept + 1)[:, None]) & (slots < (index + K + 1)[:, None])
        cache = _forget(cache, rejected, 0)
        if draft_cache is not None:
            draft_cache = _forget(draft_cache, rejected, 0)
        return out, kept, (cache, draft_cache)


def _first_rows(fn, params, draft_params, caches, *args, n: int):
    """fn(params, draft_params, caches, *args) -> (*outputs, caches) for the first n rows of the caches (args
    have n rows; the model uses the first n cache rows in place); outputs are padded to the caches' N rows."""
    N = caches[0]["pos"].shape[0]
    *outputs, caches = fn(params, draft_params, caches, *args)
    pad = lambda o: jnp.zeros((N, *o.shape[1:]), o.dtype).at[:n].set(o)  # noqa: E731
    return (*(pad(o) for o in outputs), caches)


def _gathered_rows(fn, params, draft_params, caches, rows, *args):
    """fn(params, draft_params, caches, *args) -> (*outputs, caches) on the cache rows `rows` (P,) (args have
    P rows); an index N (padding) reads an idle row of zeros and writes nothing."""
    axis = lambda c: 1 if c.ndim == 5 else 0  # noqa: E731
    some = jax.tree.map(lambda c: jnp.take(c, rows, axis=axis(c), mode="fill", fill_value=0), caches)
    *outputs, some = fn(params, draft_params, some, *args)

    def put(c, x):
        at = (slice(None), rows) if axis(c) == 1 else (rows,)
        return c.at[at].set(x, mode="drop")

    return (*outputs, jax.tree.map(put, caches, some))


def _forget(cache: dict, rows: jax.Array, virtual: int) -> dict:
    """The cache with the slots of `rows` marked empty (prompt/prefix tuning's first slots kept).

    rows: (n,) bool for the first n cache rows, or (n, S) bool, per slot."""
    N, S = cache["pos"].shape
    if rows.ndim == 1:
        rows = rows[:, None] & (jnp.arange(S) >= virtual)[None]
    rows = jnp.zeros((N, S), bool).at[: rows.shape[0]].set(rows)
    return {**cache, "pos": jnp.where(rows, -1, cache["pos"])}


def _request_key(seed, stream, count):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), count)


@dataclasses.dataclass(eq=False)
class _Slot:
    request: Request
    hist: list[int]  # the tokens of the current context window and those generated after it
    pending: list[int]  # tokens still to prefill
    next_pos: int  # position of the next token written
    index: int = 0  # cache slot of the next token written
    fresh: bool = True  # drop the old context at the next prefill
    feed: int | None = None  # the token to decode next, when the host has it
    inflight: int = 0  # decode steps dispatched whose token the host has not seen (the next feeds on the device)


class Engine:
    """Requests in, tokens out, over `slots` cache rows; `step()` advances every active request.

    Thread-safe in this sense: `submit` and `cancel` may be called from other threads while one thread
    runs `step()`.
    """

    def __init__(
        self,
        steps: DecodeSteps,
        *,
        slots: int,
        chunk: int = 64,
        window_shift: int | None = None,
        context: dict | None = None,
        shrink: bool = True,
    ):
        """steps: the model's compiled steps.
        slots: N, the number of sequences decoded together.
        chunk: C, prompt tokens prefilled per row per prefill step (a prefix LM prefills its prompt at once).
        window_shift: tokens dropped when a row's cache is full (default max_seq_len // 4).
        context: `init_cache` keyword arguments (an encoder-decoder's source, one row per slot); slots are then
          not reused.
        shrink: a step runs on the first 1, 2, 4, ... N cache rows, as few as hold its rows (requests take the
          lowest free slot): fewer rows computed for a few requests, at one compilation per row count.
        """
        S = steps.max_len
        self.steps, self.N, self.S = steps, slots, S
        self.window_shift = window_shift or max(1, S // 4)
        if not 1 <= self.window_shift < S:
            raise ValueError(f"window_shift must be in [1, {S}), got {self.window_shift}")
        self.W = S - self.window_shift  # the tokens a refill keeps
        self.C = self.W if steps.prefix_lm else max(1, min(chunk, self.W))
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if steps.seq2seq and context is None:
            raise ConfigError("an encoder-decoder engine needs its sources (context) up front")
        self.single_use, self.shrink = context is not None, shrink
        self._context = context or {}
        self.cache = steps.init_cache(steps.params, steps.draft_params, slots, self._context)
        self.slots: list[_Slot | None] = [None] * slots
        self.used = [False] * slots
        self.queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._inflight = None  # (the last decode step's tokens on the device, its rows)
        self._no_prev = steps.place(jnp.zeros(slots, jnp.int32))
        self.stats = {"steps": 0, "drafted": 0, "kept": 0}  # speculative decoding: drafts proposed and kept

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, request: Request) -> Request:
        """Queues a request (checked here: a bad one raises ValueError and is not queued)."""
        if not request.prompt:
            raise ValueError("a prompt needs at least one token (use the end-of-text id to start from nothing)")
        if int(request.max_new_tokens) != request.max_new_tokens or request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {request.max_new_tokens}")
        check_sampling(request.temperature, request.top_k, request.top_p)
        with self._lock:
            self.queue.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request at the next step (finish_reason "cancelled"); its slot is freed."""
        with self._lock:
            self._cancelled.add(id(request))

    def abort(self, reason: str = "cancelled") -> list[Request]:
        """Ends every queued and running request now with `reason` (shutdown, or a failed step); returns them."""
        with self._lock:
            ended = list(self.queue) + [s.request for s in self.slots if s is not None]
            self.queue.clear()
            self.slots = [None] * self.N
            self._cancelled.clear()
            self._inflight = None
        self.cache = self.steps.init_cache(
            self.steps.params, self.steps.draft_params, self.N, self._context
        )  # a failed step may have eaten it
        for r in ended:
            r.finish_reason = reason
        return ended

    @property
    def active(self) -> int:
        """Requests in slots or queued."""
        return sum(s is not None for s in self.slots) + len(self.queue)

    @property
    def free_slots(self) -> int:
        return sum(s is None and not (self.single_use and u) for s, u in zip(self.slots, self.used))

    # ------------------------------------------------------------------------------------------ stepping

    def step(self) -> list[Request]:
        """Admits queued requests into free slots, runs one prefill chunk (if any slot is filling) and one
        decode step (if any slot is decoding). Returns the requests admitted, cancelled, finished or with new
        tokens."""
        touched: dict[int, Request] = {}
        self._apply_cancels(touched)
        self._admit(touched)
        if any(s is not None and s.pending for s in self.slots):
            self._prefill(touched)
        if self.steps.draft is None:
            self._decode(touched)
        elif any(s is not None and not s.pending and s.feed is not None for s in self.slots):
            self._speculate(touched)
        return list(touched.values())

    def run(self) -> None:
        """Steps until every submitted request is done."""
        while self.active:
            self.step()

    def _apply_cancels(self, touched):
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            for r in [r for r in self.queue if id(r) in cancelled]:
                self.queue.remove(r)
                r.finish_reason = "cancelled"
                touched[id(r)] = r
        for b, s in enumerate(self.slots):
            if s is not None and id(s.request) in cancelled:
                s.request.finish_reason = "cancelled"
                touched[id(s.request)] = s.request
                self.slots[b] = None

    def _admit(self, touched):
        with self._lock:
            for b in range(self.N):
                if not self.queue:
                    return
                if self.slots[b] is None and not (self.single_use and self.used[b]):
                    r = self.queue.popleft()
                    prompt = list(r.prompt)[-self.W :]  # a longer prompt keeps its most recent tokens
                    r.prompt_tokens, r.admitted = len(prompt), True
                    touched[id(r)] = r
                    self.slots[b] = _Slot(r, hist=list(prompt), pending=list(prompt), next_pos=0)
                    self.used[b] = True

    def _prefill(self, touched):
        """One chunk of every filling row's pending tokens, on those rows alone."""
        rows = [b for b, s in enumerate(self.slots) if s is not None and s.pending]
        P = self._rows(len(rows))
        x = _Inputs(P, self.C, self.S)
        index = np.full(P, self.N, np.int32)  # padding rows: none
        written = []
        for i, b in enumerate(rows):
            s = self.slots[b]
            chunk = s.pending[: self.C]
            written.append(len(chunk))
            x.tokens(i, chunk, s.next_pos, prefix=self.steps.prefix_lm and s.fresh and s.next_pos == 0)
            x.row(i, s.request, index=s.index, last=len(chunk) - 1, fresh=s.fresh)
            index[i] = b
        out, self.cache = self.steps.prefill(
            self.steps.params, self.steps.draft_params, self.cache, index, self._no_prev, *x.arrays(P)
        )
        out = np.asarray(out)
        for i, (b, n) in enumerate(zip(rows, written)):
            s = self.slots[b]
            s.index, s.next_pos, s.fresh = s.index + n, s.next_pos + n, False
            s.pending = s.pending[n:]
            if not s.pending:  # the prompt (or refill) is in: its next token
                self._emit(b, int(out[i]), touched)

    def _decode(self, touched):
        """One decode step for every decoding row, dispatched before the previous step's tokens are read
        (so the host's bookkeeping overlaps the device's work): a row whose next input is still on the
        device takes it from there. A row that the previous tokens finish was decoded one token too far:
        that token is dropped, and its slot is reset when it is next filled."""
        x = _Inputs(self.N, 1, self.S)
        rows = []
        for b, s in enumerate(self.slots):
            if s is None or s.pending or (s.feed is None and not s.inflight) or s.index >= self.S:
                continue
            r = s.request
            if len(r.tokens) + s.inflight >= r.max_new_tokens:
                continue  # the tokens in flight end it
            x.tokens(b, [s.feed or 0], s.next_pos)
            x.row(b, r, index=s.index, from_prev=s.inflight > 0, count=len(r.tokens) + s.inflight)
            s.index, s.next_pos, s.feed, s.inflight = s.index + 1, s.next_pos + 1, None, s.inflight + 1
            rows.append((b, r))
        previous, self._inflight = self._inflight, None
        if rows:
            prev = previous[0] if previous is not None else self._no_prev  # a device array either way: one compile
            n = self._rows(rows[-1][0] + 1)
            out, self.cache = self.steps.decode(
                self.steps.params, self.steps.draft_params, self.cache, prev, *x.arrays(n), n=n
            )
            self._inflight = (out, rows)
        if previous is not None:
            out = np.asarray(previous[0])
            for b, r in previous[1]:
                s = self.slots[b]
                if s is None or s.request is not r:
                    continue  # finished or cancelled meanwhile
                s.inflight -= 1
                self._emit(b, int(out[b]), touched)

    def _rows(self, m: int) -> int:
        """How many cache rows a step over m rows (slots 0..m-1, or m gathered) runs on: N, or with `shrink` the
        next power of two."""
        return min(self.N, 1 << (m - 1).bit_length()) if self.shrink else self.N

    def warm_up(self) -> None:
        """Compiles every step at every row count it may run on (a server does this before it listens): the
        rows are idle (they write past the cache's end), so nothing changes."""
        counts = sorted({self._rows(m) for m in range(1, self.N + 1)})
        p, d = self.steps.params, self.steps.draft_params
        for n in counts:
            rows = np.full(n, self.N, np.int32)  # padding only: no row is read or written
            self.cache = self.steps.prefill(
                p, d, self.cache, rows, self._no_prev, *_Inputs(n, self.C, self.S).arrays(n)
            )[1]
            if self.steps.draft is None:
                self.cache = self.steps.decode(
                    p, d, self.cache, self._no_prev, *_Inputs(self.N, 1, self.S).arrays(n), n=n
                )[1]
            else:
                x = _Inputs(self.N, 1, self.S)
                drafts = np.zeros((n, self.steps.K), np.int32)
                self.cache = self.steps.speculate(p, d, self.cache, drafts, x.rows[:n], x.floats[:n], n=n)[2]
        jax.block_until_ready(self.cache)

    def _speculate(self, touched):
        N, K, S = self.N, self.steps.K, self.S
        x = _Inputs(N, 1, S)
        drafts = np.zeros((N, K), np.int32)
        rows, limits = [], {}
        for b, s in enumerate(self.slots):
            if s is None or s.pending or s.feed is None:
                continue
            r = s.request
            # Never past the cache's end (the row refills there, as without a draft) or the token budget.
            limit = max(0, min(K, S - 1 - s.index, r.max_new_tokens - len(r.tokens) - 1))
            if self.steps.draft == "ngram":
                proposal = prompt_lookup(s.hist, K)
                drafts[b, : len(proposal)] = proposal
                limit = min(limit, len(proposal))
            x.row(b, r, index=s.index, feed=s.feed, position=s.next_pos, limit=limit)
            limits[b] = limit
            rows.append(b)
        n = self._rows(rows[-1] + 1)
        out, kept, self.cache = self.steps.speculate(
            self.steps.params, self.steps.draft_params, self.cache, drafts[:n], x.rows[:n], x.floats[:n], n=n
        )
        out, kept = np.asarray(out), np.asarray(kept)
        self.stats["steps"] += 1
        for b in rows:
            s = self.slots[b]
            self.stats["drafted"] += limits[b]
            self.stats["kept"] += int(kept[b])
            for i in range(int(kept[b]) + 1):  # written: the fed token, then the kept drafts
                s.index, s.next_pos, s.feed = s.index + 1, s.next_pos + 1, None
                self._emit(b, int(out[b, i]), touched)
                if self.slots[b] is None or s.pending:  # finished, or refilled at the cache's end
                    break

    def _emit(self, b: int, token: int, touched):
        s = self.slots[b]
        r = s.request
        touched[id(r)] = r
        if token in r.stop_ids:
            r.finish_reason, r.stop_token = "stop", token
        else:
            r.tokens.append(token)
            if len(r.tokens) >= r.max_new_tokens:
                r.finish_reason = "length"
        if r.done:
            self.slots[b] = None
            return
        s.hist.append(token)
        if s.inflight:  # a decode step in flight already took this token from the device
            return
        if s.index == self.S:  # cache full: keep the last W tokens as a fresh context
            s.hist = s.hist[-self.W :]
            s.pending, s.index, s.next_pos, s.fresh = list(s.hist), 0, 0, True
        else:
            s.feed = token


class _Inputs:
    """A step's host inputs packed into three arrays (per token, per row, per row floats), so that a step
    costs three host-to-device transfers instead of a dozen."""

    COLS = ("tokens", "positions", "valid", "prefix")
    ROWS = ("index", "last", "fresh", "from_prev", "limit", "feed", "position", "top_k", "seed", "stream", "count")
    FLOATS = ("temperature", "top_p")
    BOOL = ("valid", "prefix", "fresh", "from_prev")

    def __init__(self, N: int, T: int, S: int):
        self.cols = np.zeros((N, T, len(self.COLS)), np.int32)
        self.rows = np.zeros((N, len(self.ROWS)), np.int32)
        self.rows[:, self.ROWS.index("index")] = S  # rows not in this step write past the end: nothing
        self.floats = np.zeros((N, len(self.FLOATS)), np.float32)
        self.floats[:, 1] = 1.0  # top_p off

    def tokens(self, b: int, ids: list[int], position: int, prefix: bool = False) -> None:
        n = len(ids)
        self.cols[b, :n, 0], self.cols[b, :n, 1] = ids, np.arange(position, position + n)
        self.cols[b, :n, 2], self.cols[b, :n, 3] = 1, int(prefix)

    def row(self, b: int, r: Request, **values) -> None:
        """Row b's sampling settings from its request (count: tokens it has), and `values` by name."""
        values = {
            "top_k": r.top_k,
            "seed": r.seed % 2**32,
            "stream": r.stream % 2**32,
            "count": len(r.tokens),
            **values,
        }
        for name, v in values.items():
            self.rows.view(np.uint32)[b, self.ROWS.index(name)] = int(v) % 2**32
        self.floats[b] = r.temperature, r.top_p

    def arrays(self, n: int):
        """The first n rows of each."""
        return self.cols[:n], self.rows[:n], self.floats[:n]

    @classmethod
    def unpack(cls, cols, rows, floats) -> dict:
        out = {} if cols is None else {n: cols[..., i] for i, n in enumerate(cls.COLS)}
        out.update({n: rows[:, i] for i, n in enumerate(cls.ROWS)})
        out.update({n: floats[:, i] for i, n in enumerate(cls.FLOATS)})
        out["seed"] = jax.lax.bitcast_convert_type(out["seed"], jnp.uint32)
        out["stream"] = jax.lax.bitcast_convert_type(out["stream"], jnp.uint32)
        return {n: v.astype(bool) if n in cls.BOOL else v for n, v in out.items()}


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting (Saxena 2023): the up to k tokens that followed the latest earlier occurrence of
    the context's last n tokens (n = max_ngram down to 1); [] when there is none."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []
