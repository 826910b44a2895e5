"""The compiled steps of one model (prefill, decode, speculate) over a paged KV cache, and how their inputs are packed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.engine.request import Request, request_key
from jaxlm.errors import ConfigError
from jaxlm.nn.adapters import adapter_count, select_adapters
from jaxlm.ops.sampling import categorical, distribution, sample, token_logprobs
from jaxlm.ops.speculative import speculative_accept

NO_BLOCK = 2**30  # a block-table entry past every pool: reads fill, writes drop
TOP_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's and vLLM's limit)


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
        self.words = -(-model.cfg.vocab_size // 32)  # a row's allowed-token bitmask: 32 tokens an int32
        self.adapters = adapter_count(nnx.state(model))  # LoRA banks (multi-LoRA serving): a row's `adapter` picks one
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
        self.copy_blocks = jax.jit(_copy_blocks, donate_argnums=0)
        self.prefill = jax.jit(self._step_fn, donate_argnums=2)
        self.decode = jax.jit(self._step_fn, donate_argnums=2)  # the same function at T = 1, compiled apart
        # A prefill that also scores every prompt token (echo with logprobs): compiled when first needed.
        self.score = jax.jit(functools.partial(self._step_fn, score=True), donate_argnums=2)
        self.speculate = jax.jit(self._speculate_fn, donate_argnums=2)

    def place(self, tree):
        return tree if self.placement is None else jax.device_put(tree, self.placement)

    @property
    def params(self):
        """The model's parameters (an nnx.State). Held as `weights` (a `Flat`): the decoding stack's layers
        unstacked, one buffer set a layer, so that a step reads each weight once (a scan would copy each layer's
        slice)."""
        return _restack(self.weights, self._decoder)

    @params.setter
    def params(self, params):  # new weights of the same model (RL rollouts): the same shapes, no recompilation
        self.weights = _unstack(params, self._decoder)

    def _init_pool_fn(self, weights: Flat, draft_weights: Flat | None, blocks: int, context: dict):
        model = nnx.merge(self.graphdef, _restack(weights, self._decoder))
        cache = model.paged_cache(blocks, self.Z, **context)
        if self.draft_graphdef is None:
            return cache, None
        return cache, nnx.merge(self.draft_graphdef, _restack(draft_weights, "stack")).paged_cache(blocks, self.Z)

    def _adapted(self, weights, adapter):
        """The weights with each row's LoRA chosen, adapter (n,): 0 none, i the i-th of the banks."""
        return weights if not self.adapters else select_adapters(weights, adapter, self.adapters)

    def _models(self, weights, draft_weights):
        """The models of a step (their decoding layers' parameters come with the cache views)."""
        model = nnx.merge(self.graphdef, weights[0])
        return model, None if self.draft_graphdef is None else nnx.merge(self.draft_graphdef, draft_weights[0])

    def _views(self, weights, draft_weights, caches, table, rows, floor):
        """The caches as the models read them: the pools with the table (n, nb), slot ids (n,) and read-only
        floors (n,) of the rows, and the unstacked layers."""
        cache, draft_cache = caches
        view = {**cache, "table": table, "rows": rows, "layers": weights[1], "floor": floor}
        if draft_cache is not None:
            draft_cache = {**draft_cache, "table": table, "layers": draft_weights[1], "floor": floor}
        return view, draft_cache

    @staticmethod
    def _pools(*views):
        drop = ("table", "rows", "layers", "floor")
        return tuple(None if v is None else {n: x for n, x in v.items() if n not in drop} for v in views)

    def _step_fn(self, params, draft_params, caches, prev, table, cols, rows, floats, allowed, score: bool = False):
        """Writes each row's T tokens at its `index` (into the draft's cache too) and samples after its token
        `last`; the inputs are packed by `Inputs` (tokens, positions, valid, prefix, next: (n, T); index, last,
        slot, logprobs: (n,); fresh: rows starting a new context (prompt or prefix tuning's slots are written
        first); sampling settings; allowed: (n, words) bitmask of the tokens each row may sample, bit j of word
        w for token 32·w + j (structured output; all ones otherwise)). prev: the tokens of the previous decode
        step, still on the device: where `from_prev`, row i's first token is prev[prev_at[i]]. table: (n, nb)
        the rows' blocks.

        Returns the (n,) sampled tokens, their log-probabilities (`token_logprobs`: "chosen" (n,), "top_ids"
        and "top_lp" (n, TOP_LOGPROBS); computed when a row asks, zeros otherwise) and the pools. With
        `score`, also those of each position's `next` token: "prompt" (n, T), "prompt_top_ids" and
        "prompt_top_lp" (n, T, TOP_LOGPROBS) (the read-out then covers all T positions).
        """
        x = Inputs.unpack(cols, rows, floats)
        params, draft_params = self._adapted(_tree(params), x["adapter"]), _tree(draft_params)
        tokens, positions, valid, index = x["tokens"], x["positions"], x["valid"], x["index"]
        taken = jnp.take(prev, x["prev_at"], mode="clip")
        tokens = tokens.at[:, 0].set(jnp.where(x["from_prev"], taken, tokens[:, 0]))
        cache, draft_cache = self._views(params, draft_params, caches, table, x["slot"], x["floor"])
        model, draft = self._models(params, draft_params)
        cache = model.start_rows(cache, x["fresh"])
        # The read-out of the one position sampled after, not of all T (a prefill chunk), unless scoring.
        last = x["last"]
        read = None if score else last
        if self.prefix_lm:
            logits, cache = model(
                tokens, positions, valid, cache=cache, cache_index=index, prefix=x["prefix"], last=read
            )
        else:
            logits, cache = model.decode(tokens, positions, valid, cache=cache, cache_index=index, last=read)
        if draft_cache is not None:
            _, draft_cache = draft.decode(tokens, positions, valid, cache=draft_cache, cache_index=index, last=last)
        scores, top = {}, min(TOP_LOGPROBS, logits.shape[-1])  # a vocabulary may be smaller than 20
        if score:
            scores = dict(zip(("prompt", "prompt_top_ids", "prompt_top_lp"), token_logprobs(logits, x["next"], top)))
            logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)
        logits = logits[:, 0]
        keys = jax.vmap(request_key)(x["seed"], x["stream"], x["count"])
        masked = jnp.where(unpack_bits(allowed, logits.shape[-1]), logits, -jnp.inf)
        token = sample(keys, masked, temperature=x["temperature"], top_k=x["top_k"], top_p=x["top_p"])
        chosen = _when(jnp.any(x["logprobs"]), lambda a, t: token_logprobs(a, t, top), logits, token)
        scores.update(zip(("chosen", "top_ids", "top_lp"), chosen))
        # (N,): the next step's `prev`, one shape. A prefill of pieces may run on more rows than there are
        # slots; its tokens are only read on the host.
        if token.shape[0] <= prev.shape[0]:
            token = jnp.zeros_like(prev).at[: token.shape[0]].set(token)
        return token, scores, self._pools(cache, draft_cache)

    def _speculate_fn(self, params, draft_params, caches, drafts, table, rows, floats):
        """One speculative step per row: K drafts (from the draft model, or `drafts` (n, K) given), verified by
        the model in one pass over K + 1 tokens; see `speculative_accept`.

        Packed by `Inputs`: feed, position, index: (n,) the token to write next, its position and slot;
        limit: (n,) drafts that may be kept; sampling settings. Returns (n, K + 1) tokens (the kept drafts,
        then the next token), (n,) kept counts and the pools. Rejected drafts need no forgetting: a row
        attends to its slots below its end, and the next step overwrites them.
        """
        x = Inputs.unpack(None, rows, floats)
        params, draft_params = self._adapted(_tree(params), x["adapter"]), _tree(draft_params)
        feed, position, index, limit = x["feed"], x["position"], x["index"], x["limit"]
        cache, draft_cache = self._views(params, draft_params, caches, table, x["slot"], x["floor"])
        model, draft = self._models(params, draft_params)
        K, N = self.K, feed.shape[0]
        keys = jax.vmap(request_key)(x["seed"], x["stream"], x["count"])
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
                nxt = categorical(step_keys, jnp.log(q))
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


def bucket(n: int) -> int:
    """n rounded up to a power of two or 1.5 times one (1, 2, 3, 4, 6, 8, 12, 16, 24, ...): a compiled shape
    for every count up to n at a third padding at most, with two shapes an octave."""
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if p >= 4 and n <= p * 3 // 4 else p


def bucket_below(n: int) -> int:
    """The largest `bucket` value <= n (n >= 1)."""
    p = 1 << (n.bit_length() - 1)
    return p * 3 // 2 if p >= 2 and n >= p * 3 // 2 else p


def unpack_bits(words: jax.Array, V: int) -> jax.Array:
    """(n, W) int32 bitmasks -> (n, V) bool: token 32·w + j is bit j of word w (llguidance's layout)."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=words.dtype)) & 1
    return bits.reshape(words.shape[0], -1)[:, :V].astype(bool)


def _when(flag, fn, *args):
    """fn(*args) where the traced bool `flag` holds, else zeros of the same shapes: work only some steps need."""
    zeros = lambda *a: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), jax.eval_shape(fn, *a))
    return jax.lax.cond(flag, fn, zeros, *args)


@jax.tree_util.register_pytree_node_class
class Flat:
    """A pytree held as its leaves and structure, which a jitted step flattens in one call: a model's unstacked
    layers are ~1,000 nnx Variables (SmolLM2 with NF4 weights), whose flattening, one Python callback each, took
    ~1 ms a step (an eighth of an NF4 batch-1 decode step). `tree()` gives the pytree back."""

    def __init__(self, leaves, treedef):
        self.leaves, self.treedef = list(leaves), treedef

    @classmethod
    def of(cls, tree) -> Flat:
        return cls(*jax.tree.flatten(tree))

    def tree(self):
        return jax.tree.unflatten(self.treedef, self.leaves)

    def tree_flatten(self):
        return self.leaves, self.treedef

    @classmethod
    def tree_unflatten(cls, treedef, leaves):
        return cls(leaves, treedef)


def _tree(weights):
    """The (outer, per-layer) weights of a step's argument (a `Flat`, or None: no draft model)."""
    return weights.tree() if isinstance(weights, Flat) else weights


def _unstack(state, name: str) -> Flat:
    """(state with the layers of stack `name` emptied, (layer 0's state, layer 1's, ...)): each layer's own
    buffers, sliced once here rather than at every step; as a `Flat`."""
    layers = state[name]["layers"]
    L = jax.tree.leaves(layers)[0].shape[0]
    per_layer = tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(L))
    outer = jax.tree.map(lambda a: a, state)  # a new tree over the same arrays
    outer[name]["layers"] = jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), layers)
    return Flat.of((outer, per_layer))


def _restack(weights: Flat, name: str):
    """The nnx.State `_unstack` took apart."""
    outer, per_layer = _tree(weights)
    state = jax.tree.map(lambda a: a, outer)
    state[name]["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    return state


BLOCK_AXIS = {"pos": 0, "k": 1, "v": 1}  # a pool's arrays by name: (NB, Z) and (L, NB, Z, ...); others are per row


def _grow(caches, blocks: int):
    """The pools with `blocks` blocks: the old ones in place, the new ones empty (position -1)."""

    def pad(name, x):
        if name not in BLOCK_AXIS:
            return x  # per-row state (an encoder-decoder's memory)
        axis = BLOCK_AXIS[name]
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, blocks - x.shape[axis])
        return jnp.pad(x, widths, constant_values=-1 if name == "pos" else 0)

    return tuple(None if c is None else {n: pad(n, x) for n, x in c.items()} for c in caches)


def _copy_blocks(caches, src, dst):
    """The pools with block dst[i] a copy of block src[i] (prefix caching's copy on reuse), every layer; dst
    entries past the pool copy nothing (padding)."""

    def copy(name, x):
        if name not in BLOCK_AXIS:
            return x
        at = (slice(None),) * BLOCK_AXIS[name]
        return x.at[(*at, dst)].set(x[(*at, src)], mode="drop")

    return tuple(None if c is None else {n: copy(n, x) for n, x in c.items()} for c in caches)


class Inputs:
    """A step's host inputs packed into four arrays (per token, per row, per row floats, each row's allowed
    tokens), so that a step costs four host-to-device transfers instead of a dozen."""

    COLS = ("tokens", "positions", "valid", "prefix", "next")
    ROWS = (
        "index", "last", "fresh", "from_prev", "prev_at", "slot", "limit", "feed", "position", "top_k", "seed",
        "stream", "count", "logprobs", "floor", "adapter",
    )  # fmt: skip
    FLOATS = ("temperature", "top_p")
    BOOL = ("valid", "prefix", "fresh", "from_prev", "logprobs")

    def __init__(self, N: int, T: int, S: int, words: int):
        """N rows of T tokens in a context of S; words: `DecodeSteps.words` (the allowed-token bitmask's)."""
        self.cols = np.zeros((N, T, len(self.COLS)), np.int32)
        self.allowed = np.full((N, words), -1, np.int32)  # every token (structured output narrows a row's)
        self.rows = np.zeros((N, len(self.ROWS)), np.int32)
        self.rows[:, self.ROWS.index("index")] = S  # padding rows write past the end (and own no blocks)
        self.floats = np.zeros((N, len(self.FLOATS)), np.float32)
        self.floats[:, 1] = 1.0  # top_p off

    def tokens(self, b: int, ids: list[int], position: int, prefix: bool = False, after: list[int] = ()) -> None:
        """Row b's tokens from `position`; after: the tokens that follow them (scored), as far as known."""
        n = len(ids)
        self.cols[b, :n, 0], self.cols[b, :n, 1] = ids, np.arange(position, position + n)
        self.cols[b, :n, 2], self.cols[b, :n, 3] = 1, int(prefix)
        follow = (list(ids[1:]) + list(after[:1]))[:n]
        self.cols[b, : len(follow), 4] = follow

    def row(self, b: int, r: Request, **values) -> None:
        """Row b's sampling settings from its request (count: tokens it has), and `values` by name."""
        values = {
            "top_k": r.top_k,
            "seed": r.seed % 2**32,
            "stream": r.stream % 2**32,
            "count": len(r.tokens),
            "logprobs": r.logprobs is not None,
            "adapter": r.adapter,
            **values,
        }
        for name, v in values.items():
            self.rows.view(np.uint32)[b, self.ROWS.index(name)] = int(v) % 2**32
        self.floats[b] = r.temperature, r.top_p

    def arrays(self, n: int):
        """The first n rows of each (what the prefill and decode steps take)."""
        return self.cols[:n], self.rows[:n], self.floats[:n], self.allowed[:n]

    @classmethod
    def unpack(cls, cols, rows, floats) -> dict:
        out = {} if cols is None else {n: cols[..., i] for i, n in enumerate(cls.COLS)}
        out.update({n: rows[:, i] for i, n in enumerate(cls.ROWS)})
        out.update({n: floats[:, i] for i, n in enumerate(cls.FLOATS)})
        out["seed"] = jax.lax.bitcast_convert_type(out["seed"], jnp.uint32)
        out["stream"] = jax.lax.bitcast_convert_type(out["stream"], jnp.uint32)
        return {n: v.astype(bool) if n in cls.BOOL else v for n, v in out.items()}
