"""The continuous batcher: admits requests into slots, gives them KV blocks, and runs the compiled steps."""

from __future__ import annotations

import collections
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.engine.prefix import PrefixCache, block_names, common_length, root_name
from jaxlm.engine.request import Request, check_sampling
from jaxlm.engine.steps import NO_BLOCK, TOP_LOGPROBS, DecodeSteps, Inputs, bucket, bucket_below
from jaxlm.errors import ConfigError


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
    order: int = 0  # admission order: prefill serves the earliest admitted rows first
    scoring: bool = False  # its prompt's log-probabilities are still to be computed (the first prefill)
    names: list[bytes] | None = None  # prefix caching: its prompt's full blocks' names (None: not matched yet)
    prompt: list[int] | None = None  # prefix caching: the prompt its blocks hold (None: not matched, a refill)
    floor: int = 0  # its slots below this are shared blocks: read-only
    named: int = 0  # its blocks cached so far (matched, or produced and added; its last block counts too)
    scored: list = dataclasses.field(default_factory=list)  # per prompt position: (log p, all alternatives)


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
        prefill_tokens: int = 1024,
        prefix_caching: bool = True,
        short_chunks: bool = True,
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
        prefill_tokens: the most prompt tokens one prefill step takes: it runs on at most the power of two of
          rows <= prefill_tokens / T (T: its row length, C or the piece), the earliest admitted first. A step
          over more tokens is no faster per token (it is compute-bound already), holds more activations, and
          each row count is one more compiled program (tens of MB each for a real model).
        short_chunks: with `shrink`, prefill in pieces of C / 4 tokens: a row's next (up to C) tokens are
          ceil(len / (C / 4)) rows of one step, all on its slot (a step writes every row's K/V before any row
          reads its blocks, so a piece sees the pieces before it), and several requests share the step. A
          prompt tail (the rest of a prompt after cached blocks) then pads to C / 4, not to C. Unshrunk, a
          step runs at C / 4 tokens a row when no row has more.
        prefix_caching: a prompt's full blocks are kept, named by their tokens (`jaxlm.engine.prefix`), and a
          later prompt that begins with the same blocks reuses them instead of prefilling them; its next block
          starts as a copy of the kept block (a prompt's last, partial one too) that begins with the most of
          its tokens, as a multiple-choice question's choices share the question's last block. A row that
          would wait for a block, or tokens, another row is prefilling waits for them; idle blocks are
          evicted least recently used first when a row needs a block and none is free (before the pool
          grows). Not with prompt or prefix tuning, prefix LMs or encoder-decoders.
        """
        S = steps.max_len
        self.steps, self.N, self.S = steps, slots, S
        self.window_shift = window_shift or max(1, S // 4)
        if not 1 <= self.window_shift < S:
            raise ValueError(f"window_shift must be in [1, {S}), got {self.window_shift}")
        self.W = S - self.window_shift  # the tokens a refill keeps
        self.C = self.W if steps.prefix_lm else max(1, min(chunk, self.W))
        short = short_chunks and self.C >= 32 and not steps.prefix_lm
        self.chunks = (self.C // 4, self.C) if short else (self.C,)  # prefill lengths
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
        if int(prefill_tokens) != prefill_tokens or prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be an integer >= 1, got {prefill_tokens}")
        if shrink:  # prefill in pieces of the shortest chunk (C itself without short chunks: a row a piece)
            self.piece = self.chunks[0]
            per_row = self.C // self.piece
            fit = 1 << (max(per_row, prefill_tokens // self.piece).bit_length() - 1)
            self.prefill_rows = min(slots * per_row, fit)  # rows (pieces) of a prefill step
        else:  # a step runs on N rows anyway
            self.piece, self.prefill_rows = None, slots
        self._admissions = 0
        cacheable = prefix_caching and not (self.P or steps.prefix_lm or steps.seq2seq or context is not None)
        self.prefix = PrefixCache() if cacheable else None
        self._cached_weights = steps.weights  # the weights the cached blocks were computed with
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
        a = request.adapter
        if int(a) != a or not 0 <= a <= self.steps.adapters:
            raise ValueError(f"adapter must be an integer in [0, {self.steps.adapters}] (0: the base model), got {a}")
        k = request.logprobs
        if k is not None and (int(k) != k or not 0 <= k <= TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {TOP_LOGPROBS}], got {k}")
        if k is not None and self.steps.draft is not None:
            raise ValueError("log-probabilities are not computed with speculative decoding (a draft model)")
        if request.constraint is not None and self.steps.draft is not None:
            raise ValueError("structured output is not decoded with speculative decoding (a draft model)")
        if request.score_prompt:
            if k is None:
                raise ValueError("score_prompt needs logprobs (0 or more alternatives)")
            if self.steps.prefix_lm or self.steps.seq2seq:
                raise ValueError("prompt log-probabilities are for causal decoder-only models")
            if len(request.prompt) >= self.S:
                raise ValueError(
                    f"a scored prompt must fit the context with room for one token: at most {self.S - 1} tokens, "
                    f"got {len(request.prompt)}"
                )
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
        if self.prefix is not None:
            self.prefix.clear()
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
        idle = 0 if self.prefix is None else len(self.prefix.idle)
        held = self.pool_blocks - len(self.free_blocks) - idle  # by rows (idle named blocks wait for reuse)
        return {
            "kv_bytes": pool_bytes,
            "kv_block_bytes": pool_bytes // self.pool_blocks,
            "kv_block_size": self.Z,
            "kv_blocks": self.pool_blocks,
            "kv_blocks_used": held,
            "kv_blocks_reserved": self.reserved,
            "kv_blocks_budget": self.budget,
            "kv_blocks_cached": 0 if self.prefix is None else len(self.prefix.kept),
            "kv_blocks_idle": idle,
            "prefix_hit_tokens": 0 if self.prefix is None else self.prefix.hit_tokens,
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
        self._drop_blocks(s)
        self.reserved -= s.reserve
        self.slots[b] = None

    def _drop_blocks(self, s: _Slot) -> None:
        """s's blocks go back: named ones to the prefix cache (idle once no row holds them), the rest free."""
        kept = self.prefix is not None
        self.free_blocks.extend(x for x in reversed(s.blocks) if not (kept and self.prefix.release(x)))
        s.blocks = []

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
                    # A longer prompt keeps its most recent tokens (a scored one is kept whole: it fits).
                    prompt = list(r.prompt) if r.score_prompt else list(r.prompt)[-self.W :]
                    need = self._need(r, len(prompt))
                    if self.reserved + need > self.budget:
                        return  # waits (in order) until running requests return blocks
                    self.queue.popleft()
                    r.prompt_tokens, r.admitted = len(prompt), True
                    touched[r] = r
                    self._admissions += 1
                    self.slots[b] = _Slot(
                        r, hist=list(prompt), pending=list(prompt), next_pos=0, reserve=need, order=self._admissions,
                        scoring=r.score_prompt,
                    )  # fmt: skip
                    if r.score_prompt:
                        self._scored(self.slots[b], [None])
                    self.reserved += need
                    self.used[b] = True

    def _take_blocks(self, b: int, end: int) -> int:
        """Gives slot b the blocks for its slots below `end` (its reservation covers them); returns how many
        blocks of its table a step writing up to `end` reads."""
        s = self.slots[b]
        want = min(s.reserve, -(-(end + self.P) // self.Z))
        while len(s.blocks) < want:
            s.blocks.append(self._new_block())
        return max(1, -(-(end + self.P) // self.Z))

    def _new_block(self) -> int:
        """A free block (within the reservations, so there is room)."""
        if not self.free_blocks:
            # Idle cached blocks make room before the pool grows: a larger pool is one more compilation of
            # every step, so the cache keeps what fits in the pool the rows need.
            evicted = None if self.prefix is None else self.prefix.evict()
            if evicted is None:
                self._grow_pool()
            else:
                self.free_blocks.append(evicted)
        return self.free_blocks.pop()

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
        """One prefill step over the earliest admitted filling rows: with `shrink`, each row's next (up to C)
        tokens in pieces, as many rows as `prefill_rows` pieces hold; unshrunk, one chunk of each of N rows."""
        rows = [b for b, s in enumerate(self.slots) if s is not None and s.pending]
        rows = sorted(rows, key=lambda b: self.slots[b].order)
        if self.prefix is not None:
            rows = self._match(rows)
            if not rows:
                return
        if not self.shrink:  # every step runs on N rows: one step at the longest chunk, a row each
            rows = rows[: self.prefill_rows]
            T = max(min(t for t in self.chunks if t >= len(self.slots[b].pending[: self.C])) for b in rows)
            self._prefill_rows([(b, 1) for b in rows], T, touched)
            return
        # (slot, pieces), the earliest admitted first, as many pieces as a step of a compiled row count holds:
        # the last row may take only its first pieces (the rest goes in the next step). Padding a step up to
        # the next row count would compute up to a third of it for nothing (scoring traffic: 17% measured).
        plan, room = [], self.prefill_rows
        for b in rows:
            n = min(room, -(-len(self.slots[b].pending[: self.C]) // self.piece))
            plan.append((b, n))
            room -= n
            if not room:
                break
        excess = sum(n for _, n in plan) - bucket_below(sum(n for _, n in plan))
        while excess:
            b, n = plan.pop()
            if n > excess:
                plan.append((b, n - excess))
            excess -= min(n, excess)
        self._prefill_rows(plan, self.piece, touched)

    def _prefill_rows(self, plan: list[tuple[int, int]], T: int, touched):
        """One prefill step: slot b's next n·T pending tokens (or fewer: the rest) as n rows of T, for each
        (b, n) of `plan`."""
        pieces = sum(n for _, n in plan)
        P = min(self.prefill_rows, bucket(pieces)) if self.shrink else self.N
        x = Inputs(P, T, self.S, self.steps.words)
        taken, first, slots, reads, i = {}, {}, [], [], 0
        for b, n in plan:
            s = self.slots[b]
            taken[b], first[b] = min(len(s.pending), n * T), i
            read = self._take_blocks(b, s.index + n * T)
            prefix = self.steps.prefix_lm and s.fresh and s.next_pos == 0
            for j in range(n):
                at = j * T
                chunk = s.pending[at : min(at + T, taken[b])]
                x.tokens(i, chunk, s.next_pos + at, prefix=prefix, after=s.pending[at + len(chunk) :][:1])
                fresh = s.fresh and j == 0
                x.row(i, s.request, index=s.index + at, last=len(chunk) - 1, fresh=fresh, slot=b, floor=s.floor)
                slots.append(b)
                reads.append(read)
                i += 1
            if s.request.constraint is not None and taken[b] == len(s.pending):  # it samples after this step
                s.request.constraint.fill(x.allowed[i - 1])
        table = self._table(slots, reads, P)
        scoring = any(self.slots[b].scoring for b, _ in plan)
        step = self.steps.score if scoring else self.steps.prefill
        out, scores, self.cache = step(
            self.steps.weights, self.steps.draft_params, self.cache, self._no_prev, table, *x.arrays(P)
        )
        out = np.asarray(out)
        scores = _host(scores, [self.slots[b].request for b, _ in plan])
        for b, n in plan:
            s, k, last = self.slots[b], taken[b], first[b] + n - 1  # last: the row of its final piece
            s.index, s.next_pos, s.fresh = s.index + k, s.next_pos + k, False
            s.pending = s.pending[k:]
            if s.scoring:  # each position whose next token is a prompt token, piece by piece
                at = [(first[b] + p // T, p % T) for p in range(k if s.pending else k - 1)]
                lp = [float(scores["prompt"][r, j]) for r, j in at]
                self._scored(s, list(zip(lp, [_top(scores, "prompt_top", TOP_LOGPROBS, r, j) for r, j in at])))
                s.scoring = bool(s.pending)
            if self.prefix is not None and s.prompt is not None:
                self._name_blocks(s)
            if not s.pending:  # the prompt (or refill) is in: its next token
                self._emit(b, int(out[last]), touched, _chosen(scores, s.request, last))

    @staticmethod
    def _scored(s: _Slot, entries: list) -> None:
        """Prompt log-probabilities of s's next positions: (log p, all alternatives) each, or None (the first)."""
        s.scored += entries
        r, k = s.request, s.request.logprobs
        r.prompt_logprobs += [None if e is None else e[0] for e in entries]
        r.prompt_top_logprobs += [None if e is None else e[1][:k] for e in entries]

    def _match(self, rows: list[int]) -> list[int]:
        """Prefix caching, before a row's first prefill: its prompt's cached full blocks become its first
        blocks, and a copy of the cached block that begins like its next one the block after them (at least
        its last prompt token is left to prefill, to sample after). Returns the rows that may prefill now: a
        row whose next block, or tokens of it, another row is prefilling waits for it (in a shrinking engine)."""
        if self.steps.weights is not self._cached_weights:  # new weights (RL rollouts): cached K/V is stale
            self.free_blocks.extend(self.prefix.clear())
            self._cached_weights = self.steps.weights
        Z, ready, copies = self.Z, [], []
        producing, writing = set(), collections.defaultdict(list)  # names; tokens by (parent, first token)
        for b in rows:
            if self.slots[b].prompt is not None:
                self._producing(self.slots[b], producing, writing)
        for b in rows:
            s = self.slots[b]
            if s.names is None:
                prompt = s.pending
                names = block_names(prompt, Z, (len(prompt) - 1) // Z, s.request.adapter)
                j = len(self.prefix.cached(names, scored=s.scoring))
                parent = _parent(names, j, s.request.adapter)
                after = prompt[j * Z : min((j + 1) * Z, len(prompt) - 1)]  # what a copy of block j may cover
                src, n = self.prefix.longest(parent, after, s.scoring)
                least = 2 if s.scoring else 1  # a scored row computes the last cached token again
                key = (parent, after[0]) if after else None
                coming = max((common_length(t, after) for t in writing.get(key, ())), default=0)
                if self.shrink and ((names[j : j + 1] and names[j] in producing) or coming >= max(n + 1, least)):
                    # another row is prefilling its next block, or tokens of it: wait, then reuse them
                    # (unshrunk, every step runs N rows anyway: computing them twice in one step is free,
                    # waiting is not)
                    continue
                pair = self._reuse(s, names, src if n >= least else None, n)
                if pair is not None:
                    copies.append(pair)
                self._producing(s, producing, writing)
            ready.append(b)
        if copies:
            src, dst = np.zeros(self.N, np.int32), np.full(self.N, NO_BLOCK, np.int32)  # one compiled shape
            src[: len(copies)], dst[: len(copies)] = zip(*copies)
            self.cache = self.steps.copy_blocks(self.cache, src, dst)
            for block, _ in copies:
                self.prefix.release(block)
        return ready

    def _reuse(self, s: _Slot, names: list[bytes], copy: int | None, n: int) -> tuple[int, int] | None:
        """Row s (its prompt pending) takes the cached named blocks of its prompt `names` and, if `copy` is a
        block, a new block after them for a copy of that one's first n tokens: (copy, new block), to copy
        before s's prefill, which starts after them."""
        Z, scoring = self.Z, s.scoring
        hit = self.prefix.match(names, scored=scoring)
        s.names, s.prompt, s.named, s.blocks = names, s.pending, len(hit), hit
        s.floor = start = len(hit) * Z
        entries = [e for x in hit for e in self.prefix.scores(x)] if scoring else []
        if copy is not None:
            self.prefix.hold(copy)  # not evicted for the copy's block
            s.blocks.append(self._new_block())
            start += n
            entries += self.prefix.scores(copy)[:n] if scoring else []
        if start:
            # A scored prompt computes its last cached token again (its write dropped if the slot is shared,
            # read-only), for the log-probability of the first token after the cached ones.
            cut = start - 1 if scoring else start
            s.index, s.next_pos, s.fresh, s.pending = cut, cut, False, s.pending[cut:]
            self.prefix.hit_tokens += start
            if scoring:
                self._scored(s, entries[1:])
        return None if copy is None else (copy, s.blocks[-1])

    def _producing(self, s: _Slot, producing: set, writing: dict) -> None:
        """What matched row s has still to prefill: the names of its full blocks, and the prompt tokens of
        each block by (parent, first token)."""
        Z, prompt = self.Z, s.prompt
        producing.update(s.names[s.named :])
        for j in range(s.index // Z, (len(prompt) - 1) // Z + 1):
            tokens = prompt[j * Z : (j + 1) * Z]
            writing[_parent(s.names, j, s.request.adapter), tokens[0]].append(tokens)

    def _name_blocks(self, s: _Slot) -> None:
        """Adds s's prompt blocks that are now full to the prefix cache, and its last block once its prompt is
        in (with their tokens' scores if it scored them)."""
        Z, prompt, score = self.Z, s.prompt, s.request.score_prompt
        while s.named < min(len(s.names), s.index // Z):
            j = s.named
            parent, scores = _parent(s.names, j, s.request.adapter), s.scored[j * Z : (j + 1) * Z]
            self.prefix.add(
                s.names[j], s.blocks[j], parent, prompt[j * Z : (j + 1) * Z], tuple(scores) if score else None
            )
            s.named += 1
        if s.named == len(s.names) and s.index >= len(prompt):
            j = s.named
            parent, scores = _parent(s.names, j, s.request.adapter), s.scored[j * Z : len(prompt)]
            self.prefix.add_tail(s.blocks[j], parent, prompt[j * Z :], tuple(scores) if score else None)
            s.named += 1

    def _decode(self, touched):
        """One decode step for every decoding row, dispatched before the previous step's tokens are read
        (so the host's bookkeeping overlaps the device's work; not while a row decodes under a grammar): a
        row whose next input is still on the device takes it from there. A row that the previous tokens
        finish was decoded one token too far: that token is dropped, and its slot is reset when it is next
        filled."""
        previous, self._inflight = self._inflight, None
        if previous is not None and any(s is not None and s.request.constraint is not None for s in self.slots):
            # Structured output: a row's next mask needs its last token, so read the step in flight first
            # (every row then waits for the host between steps, and a constrained row decodes at every step).
            self._collect(previous, touched)
            previous = None
        prev_at = {} if previous is None else previous[1]
        x = Inputs(self.N, 1, self.S, self.steps.words)
        rows, reads = [], []
        for b, s in enumerate(self.slots):
            if s is None or s.pending or (s.feed is None and not s.inflight) or s.index >= self.S:
                continue
            r = s.request
            if len(r.tokens) + s.inflight >= r.max_new_tokens:
                continue  # the tokens in flight end it
            if r.constraint is not None:
                r.constraint.fill(x.allowed[len(rows)])  # its last token is on the host (see above)
            i = len(rows)
            reads.append(self._take_blocks(b, s.index + 1))
            x.tokens(i, [s.feed or 0], s.next_pos)
            from_prev = s.inflight > 0
            x.row(
                i, r, index=s.index, from_prev=from_prev, prev_at=prev_at.get(b, 0) if from_prev else 0,
                count=len(r.tokens) + s.inflight, slot=b, floor=s.floor,
            )  # fmt: skip
            s.index, s.next_pos, s.feed, s.inflight = s.index + 1, s.next_pos + 1, None, s.inflight + 1
            rows.append(b)
        if rows:
            prev = previous[0] if previous is not None else self._no_prev  # a device array either way: one compile
            n = self._rows(len(rows))
            table = self._table(rows, reads, n)
            out, scores, self.cache = self.steps.decode(
                self.steps.weights, self.steps.draft_params, self.cache, prev, table, *x.arrays(n)
            )
            self._inflight = (
                out, {b: i for i, b in enumerate(rows)}, [(b, self.slots[b].request) for b in rows], scores
            )  # fmt: skip
        if previous is not None:
            self._collect(previous, touched)

    def _collect(self, previous, touched) -> None:
        """The tokens of a dispatched decode step, to their rows."""
        out = np.asarray(previous[0])
        scores = _host(previous[3], [r for _, r in previous[2]])
        for b, r in previous[2]:
            s = self.slots[b]
            if s is None or s.request is not r:
                continue  # finished or cancelled meanwhile
            s.inflight -= 1
            self._emit(b, int(out[previous[1][b]]), touched, _chosen(scores, r, previous[1][b]))

    def _rows(self, m: int) -> int:
        """How many rows a step over m rows runs on: N, or with `shrink` the next power of two."""
        return min(self.N, 1 << (m - 1).bit_length()) if self.shrink else self.N

    def shapes(self, tokens: int | None = None, prefill: bool = False) -> list[tuple[int, int]]:
        """The (rows, blocks read per row) shapes a decode (or prefill) step may run on, for rows holding up to
        `tokens` tokens (default: the full context)."""
        if prefill and self.shrink:  # pieces: up to prefill_rows rows, 1.5 times a power of two too
            counts = sorted({min(self.prefill_rows, bucket(m)) for m in range(1, self.prefill_rows + 1)})
        else:
            counts = sorted({self._rows(m) for m in range(1, (self.prefill_rows if prefill else self.N) + 1)})
        most = self.row_blocks if tokens is None else max(1, -(-(min(tokens, self.S) + self.P) // self.Z))
        reads = sorted({self._table([], [m], 1).shape[1] for m in range(1, most + 1)})
        return [(n, nb) for n in counts for nb in reads]

    def warm_up(self, tokens: int | None = None, short_chunks: bool = True, score: bool = False) -> None:
        """Compiles every step at every shape it may run on with rows of up to `tokens` tokens (default: the
        full context; a server does this before it listens): the rows are idle (they own no blocks), so
        nothing changes. Larger shapes compile when first needed, as do (unshrunk) the prefill steps of short
        chunks without `short_chunks`. score: also the prefill steps that score prompts (echo with logprobs, as
        lm-evaluation-harness asks for log-likelihoods)."""
        p, d = self.steps.weights, self.steps.draft_params
        prefills = (self.steps.prefill, self.steps.score) if score else (self.steps.prefill,)
        lengths = self.chunks if short_chunks else (self.C,)
        for T in (self.piece,) if self.shrink else lengths:
            for n, nb in self.shapes(tokens, prefill=True):
                table = np.full((n, nb), NO_BLOCK, np.int32)  # padding only: no block is read or written
                x = Inputs(n, T, self.S, self.steps.words)
                for step in prefills:
                    self.cache = step(p, d, self.cache, self._no_prev, table, *x.arrays(n))[2]
        for n, nb in self.shapes(tokens):
            table = np.full((n, nb), NO_BLOCK, np.int32)
            x = Inputs(n, 1, self.S, self.steps.words)
            if self.steps.draft is None:
                self.cache = self.steps.decode(p, d, self.cache, self._no_prev, table, *x.arrays(n))[2]
            else:
                drafts = np.zeros((n, self.steps.K), np.int32)
                self.cache = self.steps.speculate(p, d, self.cache, drafts, table, x.rows, x.floats)[2]
        jax.block_until_ready(self.cache)

    def _speculate(self, touched):
        K, S = self.steps.K, self.S
        rows, limits, reads = [], {}, []
        candidates = [b for b, s in enumerate(self.slots) if s is not None and not s.pending and s.feed is not None]
        n = self._rows(len(candidates))
        x = Inputs(n, 1, S, 1)  # a speculative step samples without masks (no structured output)
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
            x.row(i, r, index=s.index, feed=s.feed, position=s.next_pos, limit=limit, slot=b, floor=s.floor)
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

    def _emit(self, b: int, token: int, touched, logprob=None):
        """Slot b's next token (and its log-probabilities, when its request asks)."""
        s = self.slots[b]
        r = s.request
        touched[r] = r
        if token in r.stop_ids:
            r.finish_reason, r.stop_token = "stop", token
        else:
            r.tokens.append(token)
            if r.constraint is not None:
                r.constraint.accept(token)
            if logprob is not None:
                r.token_logprobs.append(logprob[0])
                r.top_logprobs.append(logprob[1])
            if len(r.tokens) >= r.max_new_tokens:
                r.finish_reason = "length"
        if r.done:
            self._release(b)
            return
        s.hist.append(token)
        if s.inflight:  # a decode step in flight already took this token from the device
            return
        if s.index == self.S:  # cache full: keep the last W tokens as a fresh context, in blocks of its own
            s.hist = s.hist[-self.W :]
            s.pending, s.index, s.next_pos, s.fresh = list(s.hist), 0, 0, True
            if self.prefix is not None:
                self._drop_blocks(s)
                s.names, s.prompt, s.named, s.floor = [], None, 0, 0
        else:
            s.feed = token


def _parent(names: list[bytes], j: int, adapter: int) -> bytes:
    """The name block j of a prompt with full-block `names` is cached under (`jaxlm.engine.prefix`)."""
    return names[j - 1] if j else root_name(adapter)


def _host(scores: dict, requests: list[Request]) -> dict | None:
    """A step's log-probability arrays on the host, when one of its rows' requests asks for them."""
    if not any(r.logprobs is not None for r in requests):
        return None
    return {name: np.asarray(a) for name, a in scores.items()}


def _top(scores: dict, prefix: str, k: int, *at) -> list[tuple[int, float]]:
    ids, lps = scores[prefix + "_ids"][at][:k], scores[prefix + "_lp"][at][:k]
    return list(zip(ids.tolist(), lps.tolist()))


def _chosen(scores: dict | None, r: Request, i: int):
    """(log p of row i's sampled token, its top alternatives) for a request that asks, else None."""
    if scores is None or r.logprobs is None:
        return None
    return float(scores["chosen"][i]), _top(scores, "top", r.logprobs, i)


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting (Saxena 2023): the up to k tokens that followed the latest earlier occurrence of
    the context's last n tokens (n = max_ngram down to 1); [] when there is none."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []
