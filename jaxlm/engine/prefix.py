"""Prefix caching: the full KV blocks of prompts, found again by their tokens, so that a prompt that begins
like an earlier one (a shared system prompt, the n choices of a request, the choices of a multiple-choice
question) prefills only what is new.

A block is named by a hash chain over the prompt's blocks of Z tokens (the digest of its tokens and of the
name of the block before it), so a name stands for the whole prefix up to the block's end, as in vLLM. A
cryptographic digest (BLAKE2b, 128 bits): one client must not be able to craft a prompt whose name meets
another's. A named block is shared read-only by every row that uses it (rows write only after their shared
blocks); when no row holds it any more it stays in the pool, idle, until the engine needs its room and evicts
the least recently used.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def block_names(tokens: list[int], Z: int, count: int, adapter: int = 0) -> list[bytes]:
    """The names of the first `count` full blocks of Z tokens, computed with LoRA `adapter` (0: none): the same
    tokens under another adapter have other keys and values."""
    names, prev = [], b"" if not adapter else b"adapter %d" % adapter
    for j in range(count):
        digest = hashlib.blake2b(prev + np.asarray(tokens[j * Z : (j + 1) * Z], np.int64).tobytes(), digest_size=16)
        prev = digest.digest()
        names.append(prev)
    return names


class PrefixCache:
    """Named blocks: which block holds each name, how many rows hold each block, the idle ones in LRU order,
    and the prompt log-probabilities of the tokens of blocks whose producer scored them (or None)."""

    def __init__(self):
        self.block_of: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}
        self.scores: dict[int, tuple | None] = {}
        self.refs: collections.Counter[int] = collections.Counter()
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # least recently used first
        self.hit_tokens = 0

    def __contains__(self, block: int) -> bool:
        return block in self.name_of

    def cached(self, names: list[bytes], scored: bool) -> list[int]:
        """The blocks of the longest cached prefix of `names` (with scores, if `scored`)."""
        out = []
        for name in names:
            block = self.block_of.get(name)
            if block is None or (scored and self.scores[block] is None):
                break
            out.append(block)
        return out

    def match(self, names: list[bytes], scored: bool) -> list[int]:
        """`cached`, now held by the caller."""
        out = self.cached(names, scored)
        for block in out:
            self.refs[block] += 1
            self.idle.pop(block, None)
        return out

    def add(self, name: bytes, block: int, scores=None) -> bool:
        """Names `block` (held by its producer); False if the name is taken (the producer keeps its copy)."""
        if name in self.block_of:
            return False
        self.block_of[name], self.name_of[block], self.scores[block] = block, name, scores
        self.refs[block] = 1
        return True

    def release(self, block: int) -> bool:
        """A row lets go of `block`: True if it is a named block (it stays, idle once no row holds it), False if
        it is the caller's to free."""
        if block not in self.name_of:
            return False
        self.refs[block] -= 1
        if self.refs[block] == 0:
            del self.refs[block]
            self.idle[block] = None
        return True

    def evict(self) -> int | None:
        """The least recently used idle block, unnamed and free for reuse; None if none is idle."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        del self.block_of[self.name_of.pop(block)]
        del self.scores[block]
        return block

    def clear(self) -> None:
        self.__init__()
