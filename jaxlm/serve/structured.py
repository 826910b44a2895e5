"""Structured output: `response_format` {"type": "json_schema", "json_schema": {"schema": ...}} or
{"type": "json_object"}, decoded under a grammar so the text parses and validates.

The grammar library is llguidance (Microsoft's, MIT; vLLM's and SGLang's "guidance" backend). Of the three
maintained ones it fits here best:
  - llguidance: one abi3 wheel with no dependencies, for any CPython 3.9+ on Linux, macOS and Windows; it
    computes a row's token mask lazily from the parser state (tens of microseconds a token for a 49k
    vocabulary, measured below), with no compile-time index over the vocabulary; the widest JSON-schema
    coverage, and it says what it does not support (an error we return as a 400).
  - xgrammar (Apache-2.0): fast masks after a per-schema compilation, but it depends on torch and
    transformers for its tokenizer and mask helpers: too heavy for a serving extra.
  - outlines-core (Apache-2.0): builds a regex index over the whole vocabulary per schema (seconds for a
    large schema and vocabulary) before the first token.
The library's mask is applied inside the engine's sampler (`jaxlm.engine.steps`): disallowed tokens get
-inf before temperature, top-k and top-p; reported log-probabilities stay the model's own.

JSON is written in json.dumps' default style (", " and ": ", no other whitespace): whitespace the model may
choose freely is where small models loop.
"""

from __future__ import annotations

import numpy as np

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Compiles response formats for one tokenizer (its llguidance view is built on first use, once)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self.tokenizer, self.V, self.stops = tokenizer, int(vocab_size), sorted(stop_ids)
        self._ll = None

    def _lltokenizer(self):
        if self._ll is None:
            from llguidance import LLTokenizer, TokenizerWrapper

            vocabulary = TokenizerWrapper(_Vocabulary(self.tokenizer, self.V, self.stops))
            self._ll = LLTokenizer(vocabulary, n_vocab=self.V, eos_token=self.stops or None)
        return self._ll

    def grammar(self, schema: dict) -> str:
        """The llguidance grammar of a JSON schema; ValueError naming what the library refuses in it."""
        try:
            from llguidance import LLMatcher
        except ImportError:
            raise ValueError("structured output needs the llguidance package: pip install 'jaxlm[serve]'") from None
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid: {e}") from None
        error = LLMatcher.validate_grammar(grammar, self._lltokenizer())
        if error:
            raise ValueError(f"the JSON schema is not supported: {error}")
        return grammar

    def constraint(self, grammar: str) -> TokenConstraint:
        """A fresh constraint (one per request) of a grammar from `grammar`."""
        from llguidance import LLMatcher

        return TokenConstraint(LLMatcher(self._lltokenizer(), grammar, log_level=0), self.stops)


class TokenConstraint:
    """One request's grammar state: the engine's `Request.constraint`."""

    def __init__(self, matcher, stops: list[int]):
        self.matcher, self.stops = matcher, stops

    def fill(self, words: np.ndarray) -> None:
        """The tokens allowed next into `words` ((W,) int32 bitmask); once the text is complete, only the stop
        tokens. A matcher in error (it should not be: the engine samples only allowed tokens) allows only them
        too, so the request ends rather than writes past its grammar."""
        if not self.matcher.is_error():
            self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self.matcher.is_error():
            words[:] = 0
            for t in self.stops:
                words.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


class _Vocabulary:
    """A jaxlm tokenizer as llguidance's TokenizerWrapper reads one: each id's bytes (a special token: 0xFF
    and its name, llguidance's convention), the end-of-text ids (the stops) and an encoder of bytes."""

    def __init__(self, tokenizer, V: int, stops: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = stops[0] if stops else tokenizer.eos_id, None
        self.tokens, self.special_token_ids = [], []
        n = getattr(tokenizer, "vocab_size", V)
        for i in range(V):
            raw = tokenizer.decode_bytes([i]) if i < n else b""
            if not raw:  # a special token (or an id past the tokenizer's vocabulary): never text
                self.special_token_ids.append(i)
                raw = b"\xff" + (tokenizer.piece(i) if i < n else f"<[{i}]>").encode("utf-8")
            self.tokens.append(raw)

    def __call__(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text)
