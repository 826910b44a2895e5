"""Prefix caching: the KV blocks of prompts, found again by their tokens, so that a prompt that begins like an
earlier one (a shared system prompt, the n choices of a request, the choices of a multiple-choice question)
prefills only what is new.

A full block is named by a hash chain over the prompt's blocks of Z tokens (the digest of its tokens and of
the name of the block before it), so a name stands for the whole prefix up to the block's end, as in vLLM. A
cryptographic digest (BLAKE2b, 128 bits): one client must not be able to craft a prompt whose name meets
another's. A named block is shared read-only by every row that uses it (rows write only after their shared
blocks).

A prompt rarely ends on a block boundary, and prompts that share a prefix part inside a block: the choices of
a question share the question's last, partial block. So every cached block is also found by its first tokens
under the name of the block before it (its parent), and a row whose next block begins with the same tokens as
a cached one takes a copy of it (copy on reuse, as SGLang's radix cache does at token granularity) and
prefills from where they part. Candidates: the named blocks, and each prompt's last block (its prompt tokens:
its producer goes on writing the slots after them, which a copy's owner overwrites before it reads them).

When no row holds a block any more it stays in the pool, idle, until the engine needs its room and evicts the
least recently used.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np


def root_name(adapter: int = 0) -> bytes:
    """The parent of a prompt's first block: blocks computed with LoRA `adapter` (0: none) are apart."""
    return b"" if not adapter else b"adapter %d" % adapter


def block_names(tokens: list[int], Z: int, count: int, adapter: int = 0) -> list[bytes]:
    """The names of the first `count` full blocks of Z tokens, computed with LoRA `adapter` (0: none): the same
    tokens under another adapter have other keys and values."""
    names, prev = [], root_name(adapter)
    for j in range(count):
        digest = hashlib.blake2b(prev + np.asarray(tokens[j * Z : (j + 1) * Z], np.int64).tobytes(), digest_size=16)
        prev = digest.digest()
        names.append(prev)
    return names


def common_length(a, b) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclasses.dataclass
class _Kept:
    parent: bytes  # the name of the block before it (or `root_name`)
    tokens: tuple[int, ...]  # its valid tokens, from its first slot
    scores: tuple | None  # the prompt log-probabilities of `tokens` (None: its producer did not score them)
    name: bytes | None = None  # full blocks: its name (it is shared); None: a prompt's last block (copied)


class PrefixCache:
    """The cached blocks: which block holds each name, every kept block's tokens by (parent, first token), how
    many rows hold each block, the idle ones in LRU order, and the prompt log-probabilities of blocks whose
    producer scored them."""

    def __init__(self):
        self.block_of: dict[bytes, int] = {}  # named (full) blocks
        self.kept: dict[int, _Kept] = {}  # every cached block
        self.starts: dict[tuple[bytes, int], dict[int, None]] = collections.defaultdict(dict)
        self.refs: collections.Counter[int] = collections.Counter()
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # least recently used first
        self.hit_tokens = 0

    def __contains__(self, block: int) -> bool:
        return block in self.kept

    def scores(self, block: int) -> tuple | None:
        return self.kept[block].scores

    def cached(self, names: list[bytes], scored: bool) -> list[int]:
        """The named blocks of the longest cached prefix of `names` (with scores, if `scored`)."""
        out = []
        for name in names:
            block = self.block_of.get(name)
            if block is None or (scored and self.kept[block].scores is None):
                break
            out.append(block)
        return out

    def match(self, names: list[bytes], scored: bool) -> list[int]:
        """`cached`, now held by the caller."""
        out = self.cached(names, scored)
        for block in out:
            self.hold(block)
        return out

    def longest(self, parent: bytes, tokens, scored: bool) -> tuple[int | None, int]:
        """(block, n): the kept block under `parent` whose first n tokens equal those of `tokens`, n largest
        (with scores, if `scored`); (None, 0) if none begins like `tokens`."""
        best, n = None, 0
        for block in self.starts.get((parent, tokens[0]), ()) if len(tokens) else ():
            kept = self.kept[block]
            if scored and kept.scores is None:
                continue
            m = common_length(kept.tokens, tokens)
            if m > n:
                best, n = block, m
        return best, n

    def hold(self, block: int) -> None:
        self.refs[block] += 1
        self.idle.pop(block, None)

    def add(self, name: bytes, block: int, parent: bytes, tokens, scores=None) -> bool:
        """Names `block`, a full block (held by its producer); False if the name is taken (the producer keeps
        its copy)."""
        if name in self.block_of:
            return False
        self.block_of[name] = block
        self._keep(block, _Kept(parent, tuple(tokens), scores, name))
        return True

    def add_tail(self, block: int, parent: bytes, tokens, scores=None) -> bool:
        """Keeps a prompt's last block, with its prompt `tokens` (held by its producer, which may go on writing
        after them): later rows copy it. False if a kept block already begins with these tokens (and has
        scores, if these have)."""
        tokens = tuple(tokens)
        other, n = self.longest(parent, tokens, scored=scores is not None)
        if other is not None and n == len(tokens):
            return False
        self._keep(block, _Kept(parent, tokens, scores))
        return True

    def _keep(self, block: int, kept: _Kept) -> None:
        self.kept[block] = kept
        self.starts[kept.parent, kept.tokens[0]][block] = None
        self.refs[block] = 1

    def release(self, block: int) -> bool:
        """A row lets go of `block`: True if it is a kept block (it stays, idle once no row holds it), False if
        it is the caller's to free."""
        if block not in self.kept:
            return False
        self.refs[block] -= 1
        if self.refs[block] == 0:
            del self.refs[block]
            self.idle[block] = None
        return True

    def evict(self) -> int | None:
        """The least recently used idle block, forgotten and free for reuse; None if none is idle."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        kept = self.kept.pop(block)
        if kept.name is not None:
            del self.block_of[kept.name]
        key = (kept.parent, kept.tokens[0])
        del self.starts[key][block]
        if not self.starts[key]:
            del self.starts[key]
        return block

    def clear(self) -> list[int]:
        """Forgets every block; returns the idle ones (free again). Held ones are their holders' to free."""
        idle = list(self.idle)
        self.__init__()
        return idle
