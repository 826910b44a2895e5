"""What a client is sent of a request: token ids -> text deltas (`TextStream`), and one choice's progress and
finish reason (`Choice`)."""

from __future__ import annotations

import codecs

from jaxlm.engine import Request


class TextStream:
    """Token ids -> text deltas: incremental UTF-8 (a character split over tokens waits for its last byte) and
    stop sequences (text that could still become one is held back; a stop ends the choice, excluded)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, ids: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += self._utf8.decode(self.tokenizer.decode_bytes(ids), final=final)
        start = max(0, self.sent - self._hold)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self._held())
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _held(self) -> int:
        """Characters at the end that could still become a stop: the longest end that begins one."""
        tail = self.text[-self._hold :] if self._hold else ""
        return next((k for k in range(len(tail), 0, -1) if any(s.startswith(tail[-k:]) for s in self.stops)), 0)


class Choice:
    """One engine request and what the client has been sent of it."""

    def __init__(self, request: Request, text: TextStream):
        self.request, self.text, self.seen = request, text, 0
        self.finish_reason: str | None = None

    def advance(self) -> str:
        """The text of the tokens not yet seen; sets finish_reason when the choice is over."""
        r = self.request
        # done before the tokens: the engine appends a request's last token, then ends it, on its own thread.
        # Read the other way round, the end could be seen without the token that came just before it.
        done = r.done
        n = len(r.tokens)
        delta = self.text.feed(r.tokens[self.seen : n], final=done)
        self.seen = n
        if self.text.stopped or (done and r.finish_reason == "stop"):
            self.finish_reason = "stop"
        elif done:
            self.finish_reason = {"length": "length", "error": "error"}.get(r.finish_reason, "cancelled")
        return delta
