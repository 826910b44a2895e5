"""Continuous batching: requests join and leave a running batch between steps, over a paged KV cache.

Every row is one sequence with its own length and positions: its tokens are written at its own logical cache
slots, which live in KV blocks it holds (`jaxlm.ops.cache`: a pool of fixed-size blocks and a block table per
row, as in vLLM), so no row ever loses context because of another, a batch generates exactly what each
prompt would generate alone, and a step reads and writes only the blocks in use. Its steps:

- prefill (n, C): the next chunk of C prompt tokens of the n rows that are filling, so a long prompt is
  prefilled in chunks and decoding rows wait at most one chunk;
- decode (n, 1): one token for every decoding row;
- speculate (n, K + 1): with a draft, K drafted tokens per row verified in one pass.

Each runs on the block table (n, nb) of its rows: n and nb are powers of two (a row count up to N, the blocks
of the longest row), so a bounded set of shapes serves every mix of requests, each compiled once
(`Engine.warm_up` compiles those up to a length), and a step costs in proportion to the tokens in use.

A request leaves on a stop token, at its token limit, or when cancelled; its slot and blocks are free at the
next step. Sampling settings and seeds are per request: the i-th token of a request is drawn with
`fold_in(fold_in(PRNGKey(seed), stream), i)`, whatever else is in the batch.

When a row's cache is full (max_seq_len slots), its last `max_seq_len - window_shift` tokens are prefilled
again as a fresh context (positions restart at 0, in the blocks it holds), so generation never fails for
length and learned position tables are never indexed out of range; the other rows are not affected.
"""

from __future__ import annotations

import collections
import dataclasses
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

    Every step runs on the rows it serves and nothing else: the KV cache is a pool of blocks of
    `block_size` slots (`jaxlm.ops.cache`), and a step gets the block table of its rows (n, nb), so its cost
    is that of the blocks in use. n and nb are powers of two (a bounded set of shapes, each compiled once).

    `params` may be replaced by new weights of the same model (RL rollouts) without recompiling. The cache
    an engine holds is a pair of pools (the model's, the draft model's or None) over the same block table.
    """

    def __init__(self, model, *, prefix_lm: bool = False, draft=None, draft_tokens: int = 4, block_size: int = 16):
        """model: a `TransformerLM` (causal) or an `EncoderDecoderLM`.

        prefix_lm: the prompt attends to itself bidirectionally (a model trained with train.objective=prefix_lm).
        draft: speculative decoding: a smaller causal model over the same vocabulary, "ngram" (prompt lookup:
          drafts copied from where the context's last tokens occurred before), or None.
        draft_tokens: K, tokens drafted per step.
        block_size: Z, the slots of a KV block.
        """
        if not model.cfg.causal:
            raise ConfigError(
                "a bidirectional model (model.causal=false, e.g. BERT) cannot generate text left to right"
            )
        if int(block_size) != block_size or block_size < 1:
            raise ConfigError(f"block_size must be an integer >= 1, got {block_size}")
        self.seq2seq = bool(model.cfg.decoder_layers)
        if prefix_lm and self.seq2seq:
            raise ConfigError("prefix_lm generation is for decoder-only models")
        self.prefix_lm = prefix_lm
        self._decoder = "decoder" if self.seq2seq else "stack"  # the stack that decodes (unstacked, see `params`)
        self.graphdef, self.params = nnx.split(model)
        self.max_len = model.cfg.max_seq_len
        self.virtual = 0 if self.seq2seq else model.virtual_tokens  # prompt/prefix tuning's leading slots
        self.Z = int(block_size)
        self.row_blocks = -(-(self.max_len + self.virtual) // self.Z)  # the most blocks one row holds
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
                if draft.virtual_tokens:
                    raise ConfigError("a draft model with prompt or prefix tuning is not supported")
                self.draft_graphdef, draft_params = nnx.split(draft)
                self.draft_params = _unstack(draft_params, "stack")
        # Caches and token arrays live where the parameters do (a restored run's are committed to a mesh), so
        # that the first step sees the same kinds of arrays as every later one: one compilation each.
        self.placement = None
        leaf = next((x for x in jax.tree.leaves(self.weights) if isinstance(x, jax.Array) and x.size), None)
        if leaf is not None and leaf.sharding.is_fully_replicated:
            sharding = leaf.sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())  # any rank
            self.placement = sharding
        init_pool = jax.jit(self._init_pool_fn, static_argnums=2)
        self.init_pool = lambda blocks, context: self.place(init_pool(self.weights, self.draft_params, blocks, context))
        self.grow = jax.jit(_grow, static_argnums=1)
        self.prefill = jax.jit(self._step_fn, donate_argnums=2)
        self.decode = jax.jit(self._step_fn, donate_argnums=2)  # the same function at T = 1, compiled apart
        self.speculate = jax.jit(self._speculate_fn, donate_argnums=2)

    def place(self, tree):
        return tree if self.placement is None else jax.device_put(tree, self.placement)

    @property
    def params(self):
        """The model's parameters (an nnx.State). Held as `weights`: the decoding stack's layers unstacked, one
        buffer set a layer, so that a step reads each weight once (a scan would copy each layer's slice)."""
        return _restack(self.weights, self._decoder)

    @params.setter
    def params(self, params):  # new weights of the same model (RL rollouts): the same shapes, no recompilation
        self.weights = _unstack(params, self._decoder)

    def _init_pool_fn(self, weights, draft_weights, blocks: int, context: dict):
        model = nnx.merge(self.graphdef, _restack(weights, self._decoder))
        cache = model.paged_cache(blocks, self.Z, **context)
        if self.draft_graphdef is None:
            return cache, None
        return cache, nnx.merge(self.draft_graphdef, _restack(draft_weights, "stack")).paged_cache(blocks, self.Z)

    def _models(self, weights, draft_weights):
        """The models of a step (their decoding layers' parameters come with the cache views)."""
        model = nnx.merge(self.graphdef, weights[0])
        return model, None if self.draft_graphdef is None else nnx.merge(self.draft_graphdef, draft_weights[0])

    def _views(self, weights, draft_weights, caches, table, rows):
        """The caches as the models read them: the pools with the table (n, nb) and slot ids (n,) of the rows,
        and the unstacked layers."""
        cache, draft_cache = caches
        view = {**cache, "table": table, "rows": rows, "layers": weights[1]}
        if draft_cache is not None:
            draft_cache = {**draft_cache, "table": table, "layers": draft_weights[1]}
        return view, draft_cache

    @staticmethod
    def _pools(*views):
        drop = ("table", "rows", "layers")
        return tuple(None if v is None else {n: x for n, x in v.items() if n not in drop} for v in views)

    def _step_fn(self, params, draft_params, caches, prev, table, cols, rows, floats):
        """Writes each row's T tokens at its `index` (into the draft's cache too) and samples after its token
        `last`; the inputs are packed by `_Inputs` (tokens, positions, valid, prefix: (n, T); index, last, slot:
        (n,); fresh: rows starting a new context (prompt or prefix tuning's slots are written first); sampling
        settings). prev: the tokens of the previous decode step, still on the device: where `from_prev`, row i's
        first token is prev[prev_at[i]]. table: (n, nb) the rows' blocks.
        Returns the (n,) sampled tokens and the pools.
        """
        x = _Inputs.unpack(cols, rows, floats)
        tokens, positions, valid, index = x["tokens"], x["positions"], x["valid"], x["index"]
        taken = jnp.take(prev, x["prev_at"], mode="clip")
        tokens = tokens.at[:, 0].set(jnp.where(x["from_prev"], taken, tokens[:, 0]))
        cache, draft_cache = self._views(params, draft_params, caches, table, x["slot"])
        model, draft = self._models(params, draft_params)
        cache = model.start_rows(cache, x["fresh"])
        if self.prefix_lm:
            logits, cache = model(tokens, positions, valid, cache=cache, cache_index=index, prefix=x["prefix"])
        else:
            logits, cache = model.decode(tokens, positions, valid, cache=cache, cache_index=index)
        if draft_cache is not None:
            _, draft_cache = draft.decode(tokens, positions, valid, cache=draft_cache, cache_index=index)
        logits = jnp.take_along_axis(logits, x["last"][:, None, None], axis=1)[:, 0]
        keys = jax.vmap(_request_key)(x["seed"], x["stream"], x["count"])
        token = sample(keys, logits, temperature=x["temperature"], top_k=x["top_k"], top_p=x["top_p"])
        token = jnp.zeros_like(prev).at[: token.shape[0]].set(token)  # (N,): the next step's `prev`, one shape
        return token, self._pools(cache, draft_cache)

    def _speculate_fn(self, params, draft_params, caches, drafts, table, rows, floats):
        """One speculative step per row: K drafts (from the draft model, or `drafts` (n, K) given), verified by
        the model in one pass over K + 1 tokens; see `speculative_accept`.

        Packed by `_Inputs`: feed, position, index: (n,) the token to write next, its position and slot;
        limit: (n,) drafts that may be kept; sampling settings. Returns (n, K + 1) tokens (the kept drafts,
        then the next token), (n,) kept counts and the pools. Rejected drafts need no forgetting: a row
        attends to its slots below its end, and the next step overwrites them.
        """
        x = _Inputs.unpack(None, rows, floats)
        feed, position, index, limit = x["feed"], x["position"], x["index"], x["limit"]
        cache, draft_cache = self._views(params, draft_params, caches, table, x["slot"])
        model, draft = self._models(params, draft_params)
        K, N = self.K, feed.shape[0]
        keys = jax.vmap(_request_key)(x["seed"], x["stream"], x["count"])
        settings = {k: x[k] for k in ("temperature", "top_k", "top_p")}
        valid = jnp.ones((N, 1), bool)
        if draft_cache is not None:  # K + 1 draft steps: the last writes the K-th draft (kept, it is the context)

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
        logits, cache = model.decode(tokens, positions, jnp.ones_like(tokens, bool), cache=cache, cache_index=index)
        V = logits.shape[-1]
        flat = {k: jnp.repeat(v, K + 1) for k, v in settings.items()}
        p = distribution(logits.reshape(N * (K + 1), V), **flat).reshape(N, K + 1, V)
        if draft_cache is None:
            q = jax.nn.one_hot(drafts, V, dtype=jnp.float32)
        kept, nxt = speculative_accept(keys, drafts, q, p, limit)
        out = jnp.concatenate([drafts, jnp.zeros((N, 1), jnp.int32)], axis=1)
        out = jnp.where(jnp.arange(K + 1)[None] == kept[:, None], nxt[:, None], out)
        return out, kept, self._pools(cache, draft_cache)


def _unstack(state, name: str):
    """(state with the layers of stack `name` emptied, (layer 0's state, layer 1's, ...)): each layer's own
    buffers, sliced once here rather than at every step."""
    layers = state[name]["layers"]
    L = jax.tree.leaves(layers)[0].shape[0]
    per_layer = tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(L))
    outer = jax.tree.map(lambda a: a, state)  # a new tree over the same arrays
    outer[name]["layers"] = jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), layers)
    return outer, per_layer


def _restack(weights, name: str):
    """The nnx.State `_unstack` took apart."""
    outer, per_layer = weights
    state = jax.tree.map(lambda a: a, outer)
    state[name]["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    return state


def _grow(caches, blocks: int):
    """The pools with `blocks` blocks: the old ones in place, the new ones empty (position -1)."""

    def pad(name, x):
        if name not in ("pos", "k", "v"):
            return x  # per-row state (an encoder-decoder's memory)
        axis = 0 if name == "pos" else 1
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, blocks - x.shape[axis])
        return jnp.pad(x, widths, constant_values=-1 if name == "pos" else 0)

    return tuple(None if c is None else {n: pad(n, x) for n, x in c.items()} for c in caches)


def _request_key(seed, stream, count):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), count)


@dataclasses.dataclass(eq=False)
class _Slot:
    request: Request
    hist: list[int]  # the tokens of the current context window and those generated after it
    pending: list[int]  # tokens still to prefill
    next_pos: int  # position of the next token written
    reserve: int  # KV blocks this request may need (reserved at admission, so a running row never lacks one)
    index: int = 0  # cache slot of the next token written
    fresh: bool = True  # a new context (the prompt, or a refill) starts at the next prefill
    feed: int | None = None  # the token to decode next, when the host has it
    inflight: int = 0  # decode steps dispatched whose token the host has not seen (the next feeds on the device)
    blocks: list[int] = dataclasses.field(default_factory=list)  # the KV blocks it holds, in order


NO_BLOCK = 2**30  # a block-table entry past every pool: reads fill, writes drop


class Engine:
    """Requests in, tokens out, over `slots` rows; `step()` advances every active request.

    KV memory is a pool of blocks (`DecodeSteps`): a row takes blocks as it grows and returns them when it
    ends. A request is admitted when a slot is free and the blocks it may need (prompt + max_new_tokens, at
    most a full context) fit in the pool's budget beside those reserved by the running requests; otherwise it
    waits in the queue, so running out of KV memory never fails or disturbs a running row. The pool itself is
    allocated as blocks are taken: it starts small and doubles (one copy, and the steps compile again for the
    new size), up to the budget.

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
        kv_blocks: int | None = None,
        initial_blocks: int | None = None,
    ):
        """steps: the model's compiled steps.
        slots: N, the number of sequences decoded together.
        chunk: C, prompt tokens prefilled per row per prefill step (a prefix LM prefills its prompt at once).
        window_shift: tokens dropped when a row's cache is full (default max_seq_len // 4).
        context: `init_cache` keyword arguments (an encoder-decoder's source, one row per slot); slots are then
          not reused.
        shrink: a step runs on 1, 2, 4, ... N rows, as few as it serves (at one compilation per row count);
          False: always N.
        kv_blocks: the KV budget in blocks of `steps.Z` slots (default: every slot's full context, N x
          ceil(max_seq_len / Z)). initial_blocks: the pool's first size (default: the budget when kv_blocks
          is given, else enough for 256 tokens per slot); it doubles as needed up to the budget.
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
        self.Z, self.P, self.row_blocks = steps.Z, steps.virtual, steps.row_blocks
        self.budget = slots * self.row_blocks if kv_blocks is None else int(kv_blocks)
        if self.budget < self.row_blocks:
            raise ConfigError(
                f"kv_blocks={kv_blocks} holds less than one full context ({self.row_blocks} blocks of {self.Z} slots)"
            )
        first = self.budget if kv_blocks is not None else slots * min(self.row_blocks, -(-256 // self.Z))
        self.pool_blocks = min(self.budget, initial_blocks or first)
        self.min_read = min(self.row_blocks, max(1, 64 // self.Z))  # the fewest blocks a step reads per row
        self.single_use, self.shrink = context is not None, shrink
        self._context = context or {}
        self.cache = steps.init_pool(self.pool_blocks, self._context)
        self.free_blocks = list(range(self.pool_blocks - 1, -1, -1))  # a stack: the lowest id is taken first
        self.reserved = 0
        self.slots: list[_Slot | None] = [None] * slots
        self.used = [False] * slots
        self.queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._cancelled: set[Request] = set()  # by identity (eq=False)
        self._inflight = None  # (the last decode step's tokens on the device, {slot: row in them}, its rows)
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
            self._cancelled.add(request)

    def abort(self, reason: str = "cancelled") -> list[Request]:
        """Ends every queued and running request now with `reason` (shutdown, or a failed step); returns them."""
        with self._lock:
            ended = list(self.queue) + [s.request for s in self.slots if s is not None]
            self.queue.clear()
            self.slots = [None] * self.N
            self._cancelled.clear()
            self._inflight = None
        self.cache = self.steps.init_pool(self.pool_blocks, self._context)  # a failed step may have eaten it
        self.free_blocks, self.reserved = list(range(self.pool_blocks - 1, -1, -1)), 0
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

    @property
    def kv(self) -> dict:
        """KV memory: the pool's bytes and blocks, those held by rows and reserved for them, the budget."""
        arrays = [x for c in self.cache if c is not None for n, x in c.items() if n in ("k", "v")]
        pool_bytes = sum(x.size * x.dtype.itemsize for x in arrays)
        held = self.pool_blocks - len(self.free_blocks)
        return {
            "kv_bytes": pool_bytes,
            "kv_block_bytes": pool_bytes // self.pool_blocks,
            "kv_block_size": self.Z,
            "kv_blocks": self.pool_blocks,
            "kv_blocks_used": held,
            "kv_blocks_reserved": self.reserved,
            "kv_blocks_budget": self.budget,
        }

    # ------------------------------------------------------------------------------------------ stepping

    def step(self) -> list[Request]:
        """Admits queued requests into free slots, runs one prefill chunk (if any slot is filling) and one
        decode step (if any slot is decoding). Returns the requests admitted, cancelled, finished or with new
        tokens."""
        touched: dict[Request, Request] = {}  # ordered, by identity
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

    def _release(self, b: int) -> None:
        """Slot b is free: its blocks go back to the pool, its reservation ends."""
        s = self.slots[b]
        self.free_blocks.extend(reversed(s.blocks))
        self.reserved -= s.reserve
        self.slots[b] = None

    def _apply_cancels(self, touched):
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            for r in [r for r in self.queue if r in cancelled]:
                self.queue.remove(r)
                r.finish_reason = "cancelled"
                touched[r] = r
        for b, s in enumerate(self.slots):
            if s is not None and s.request in cancelled:
                s.request.finish_reason = "cancelled"
                touched[s.request] = s.request
                self._release(b)

    def _need(self, r: Request, prompt_tokens: int) -> int:
        """Blocks a request may hold: its prompt and new tokens, at most a full context (refills reuse it)."""
        return min(self.row_blocks, -(-(min(prompt_tokens + r.max_new_tokens, self.S) + self.P) // self.Z))

    def _admit(self, touched):
        with self._lock:
            for b in range(self.N):
                if not self.queue:
                    return
                if self.slots[b] is None and not (self.single_use and self.used[b]):
                    r = self.queue[0]
                    prompt = list(r.prompt)[-self.W :]  # a longer prompt keeps its most recent tokens
                    need = self._need(r, len(prompt))
                    if self.reserved + need > self.budget:
                        return  # waits (in order) until running requests return blocks
                    self.queue.popleft()
                    r.prompt_tokens, r.admitted = len(prompt), True
                    touched[r] = r
                    self.slots[b] = _Slot(r, hist=list(prompt), pending=list(prompt), next_pos=0, reserve=need)
                    self.reserved += need
                    self.used[b] = True

    def _take_blocks(self, b: int, end: int) -> int:
        """Gives slot b the blocks for its slots below `end` (its reservation covers them); returns how many
        blocks of its table a step writing up to `end` reads."""
        s = self.slots[b]
        want = min(s.reserve, -(-(end + self.P) // self.Z))
        while len(s.blocks) < want:
            if not self.free_blocks:
                self._grow_pool()
            s.blocks.append(self.free_blocks.pop())
        return max(1, -(-(end + self.P) // self.Z))

    def _grow_pool(self) -> None:
        """Doubles the pool (within the budget, which the reservations respect, so there is room)."""
        blocks = min(self.budget, 2 * self.pool_blocks)
        assert blocks > self.pool_blocks, "KV reservations exceed the budget"
        self.cache = self.steps.grow(self.cache, blocks)
        self.free_blocks = list(range(blocks - 1, self.pool_blocks - 1, -1)) + self.free_blocks
        self.pool_blocks = blocks

    def _table(self, rows: list[int], reads: list[int], n: int) -> np.ndarray:
        """(n, nb) block table of `rows` (padding rows: no blocks); nb: a power of two >= every row's reads."""
        nb = max([self.min_read, *reads])
        nb = min(self.row_blocks, 1 << (nb - 1).bit_length())
        table = np.full((n, nb), NO_BLOCK, np.int32)
        for i, b in enumerate(rows):
            blocks = self.slots[b].blocks[:nb]
            table[i, : len(blocks)] = blocks
        return table

    def _prefill(self, touched):
        """One chunk of every filling row's pending tokens, on those rows alone."""
        rows = [b for b, s in enumerate(self.slots) if s is not None and s.pending]
        P = self._rows(len(rows))
        x = _Inputs(P, self.C, self.S)
        written, reads = [], []
        for i, b in enumerate(rows):
            s = self.slots[b]
            chunk = s.pending[: self.C]
            written.append(len(chunk))
            reads.append(self._take_blocks(b, s.index + self.C))
            x.tokens(i, chunk, s.next_pos, prefix=self.steps.prefix_lm and s.fresh and s.next_pos == 0)
            x.row(i, s.request, index=s.index, last=len(chunk) - 1, fresh=s.fresh, slot=b)
        table = self._table(rows, reads, P)
        out, self.cache = self.steps.prefill(
            self.steps.weights, self.steps.draft_params, self.cache, self._no_prev, table, *x.arrays(P)
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
        previous, self._inflight = self._inflight, None
        prev_at = {} if previous is None else previous[1]
        x = _Inputs(self.N, 1, self.S)
        rows, reads = [], []
        for b, s in enumerate(self.slots):
            if s is None or s.pending or (s.feed is None and not s.inflight) or s.index >= self.S:
                continue
            r = s.request
            if len(r.tokens) + s.inflight >= r.max_new_tokens:
                continue  # the tokens in flight end it
            i = len(rows)
            reads.append(self._take_blocks(b, s.index + 1))
            x.tokens(i, [s.feed or 0], s.next_pos)
            from_prev = s.inflight > 0
            x.row(
                i, r, index=s.index, from_prev=from_prev, prev_at=prev_at.get(b, 0) if from_prev else 0,
                count=len(r.tokens) + s.inflight, slot=b,
            )  # fmt: skip
            s.index, s.next_pos, s.feed, s.inflight = s.index + 1, s.next_pos + 1, None, s.inflight + 1
            rows.append(b)
        if rows:
            prev = previous[0] if previous is not None else self._no_prev  # a device array either way: one compile
            n = self._rows(len(rows))
            table = self._table(rows, reads, n)
            out, self.cache = self.steps.decode(
                self.steps.weights, self.steps.draft_params, self.cache, prev, table, *x.arrays(n)
            )
            self._inflight = (out, {b: i for i, b in enumerate(rows)}, [(b, self.slots[b].request) for b in rows])
        if previous is not None:
            out = np.asarray(previous[0])
            for b, r in previous[2]:
                s = self.slots[b]
                if s is None or s.request is not r:
                    continue  # finished or cancelled meanwhile
                s.inflight -= 1
                self._emit(b, int(out[previous[1][b]]), touched)

    def _rows(self, m: int) -> int:
        """How many rows a step over m rows runs on: N, or with `shrink` the next power of two."""
        return min(self.N, 1 << (m - 1).bit_length()) if self.shrink else self.N

    def shapes(self, tokens: int | None = None) -> list[tuple[int, int]]:
        """The (rows, blocks read per row) shapes a step may run on, for rows holding up to `tokens` tokens
        (default: the full context)."""
        counts = sorted({self._rows(m) for m in range(1, self.N + 1)})
        most = self.row_blocks if tokens is None else max(1, -(-(min(tokens, self.S) + self.P) // self.Z))
        reads = sorted({self._table([], [m], 1).shape[1] for m in range(1, most + 1)})
        return [(n, nb) for n in counts for nb in reads]

    def warm_up(self, tokens: int | None = None) -> None:
        """Compiles every step at every shape it may run on with rows of up to `tokens` tokens (default: the
        full context; a server does this before it listens): the rows are idle (they own no blocks), so
        nothing changes. Larger shapes compile when first needed."""
        p, d = self.steps.weights, self.steps.draft_params
        for n, nb in self.shapes(tokens):
            table = np.full((n, nb), NO_BLOCK, np.int32)  # padding only: no block is read or written
            self.cache = self.steps.prefill(
                p, d, self.cache, self._no_prev, table, *_Inputs(n, self.C, self.S).arrays(n)
            )[1]
            if self.steps.draft is None:
                self.cache = self.steps.decode(
                    p, d, self.cache, self._no_prev, table, *_Inputs(n, 1, self.S).arrays(n)
                )[1]
            else:
                x = _Inputs(n, 1, self.S)
                drafts = np.zeros((n, self.steps.K), np.int32)
                self.cache = self.steps.speculate(p, d, self.cache, drafts, table, x.rows, x.floats)[2]
        jax.block_until_ready(self.cache)

    def _speculate(self, touched):
        K, S = self.steps.K, self.S
        rows, limits, reads = [], {}, []
        candidates = [b for b, s in enumerate(self.slots) if s is not None and not s.pending and s.feed is not None]
        n = self._rows(len(candidates))
        x = _Inputs(n, 1, S)
        drafts = np.zeros((n, K), np.int32)
        for i, b in enumerate(candidates):
            s = self.slots[b]
            r = s.request
            # Never past the cache's end (the row refills there, as without a draft) or the token budget.
            limit = max(0, min(K, S - 1 - s.index, r.max_new_tokens - len(r.tokens) - 1))
            if self.steps.draft == "ngram":
                proposal = prompt_lookup(s.hist, K)
                drafts[i, : len(proposal)] = proposal
                limit = min(limit, len(proposal))
            reads.append(self._take_blocks(b, s.index + K + 1))
            x.row(i, r, index=s.index, feed=s.feed, position=s.next_pos, limit=limit, slot=b)
            limits[b] = limit
            rows.append(b)
        table = self._table(rows, reads, n)
        out, kept, self.cache = self.steps.speculate(
            self.steps.weights, self.steps.draft_params, self.cache, drafts, table, x.rows, x.floats
        )
        out, kept = np.asarray(out), np.asarray(kept)
        self.stats["steps"] += 1
        for i, b in enumerate(rows):
            s = self.slots[b]
            self.stats["drafted"] += limits[b]
            self.stats["kept"] += int(kept[i])
            for j in range(int(kept[i]) + 1):  # written: the fed token, then the kept drafts
                s.index, s.next_pos, s.feed = s.index + 1, s.next_pos + 1, None
                self._emit(b, int(out[i, j]), touched)
                if self.slots[b] is None or s.pending:  # finished, or refilled at the cache's end
                    break

    def _emit(self, b: int, token: int, touched):
        s = self.slots[b]
        r = s.request
        touched[r] = r
        if token in r.stop_ids:
            r.finish_reason, r.stop_token = "stop", token
        else:
            r.tokens.append(token)
            if len(r.tokens) >= r.max_new_tokens:
                r.finish_reason = "length"
        if r.done:
            self._release(b)
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
    ROWS = (
        "index", "last", "fresh", "from_prev", "prev_at", "slot", "limit", "feed", "position", "top_k", "seed",
        "stream", "count",
    )  # fmt: skip
    FLOATS = ("temperature", "top_p")
    BOOL = ("valid", "prefix", "fresh", "from_prev")

    def __init__(self, N: int, T: int, S: int):
        self.cols = np.zeros((N, T, len(self.COLS)), np.int32)
        self.rows = np.zeros((N, len(self.ROWS)), np.int32)
        self.rows[:, self.ROWS.index("index")] = S  # padding rows write past the end (and own no blocks)
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
