"""Log-probabilities as the OpenAI API returns them: the legacy completions object (tokens, token_logprobs,
top_logprobs, text_offset) and the chat object (content: token, logprob, bytes, top_logprobs).

A token's text is its UTF-8 bytes decoded; a token that is not valid UTF-8 alone (a piece of a character)
is written "bytes:\\xNN..." as OpenAI writes it, and a special token (no bytes) by its vocabulary name."""

from __future__ import annotations

import codecs


class TokenTexts:
    """Token ids -> the strings and bytes the API shows, and character offsets in the decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def bytes(self, i: int) -> bytes:
        return self.tokenizer.decode_bytes([i])

    def text(self, i: int) -> str:
        raw = self.bytes(i)
        if not raw:
            return self.tokenizer.piece(i)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def offsets(self, start: int = 0) -> TextOffsets:
        return TextOffsets(self, start)

    def completion(self, ids, logprobs, tops, offsets: TextOffsets | None = None) -> dict:
        """The completions API's object for tokens `ids` with log p (None for a prompt's first token) and the
        top alternatives [(id, log p)] (None likewise); the sampled token is added to its alternatives, as
        OpenAI does ("up to logprobs + 1 elements"). `offsets` carries the text before `ids` (a stream's
        earlier chunks); without it they start the text."""
        top_dicts = []
        for i, lp, top in zip(ids, logprobs, tops):
            if top is None:
                top_dicts.append(None)
                continue
            entry = {self.text(t): v for t, v in top}
            entry.setdefault(self.text(i), lp)
            top_dicts.append(entry)
        return {
            "tokens": [self.text(i) for i in ids],
            "token_logprobs": list(logprobs),
            "top_logprobs": top_dicts,
            "text_offset": (offsets or self.offsets())(ids),
        }

    def chat(self, ids, logprobs, tops) -> dict:
        """The chat API's object: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""

        def one(i, lp):
            return {"token": self.text(i), "logprob": lp, "bytes": list(self.bytes(i))}

        return {
            "content": [
                {**one(i, lp), "top_logprobs": [one(t, v) for t, v in top]} for i, lp, top in zip(ids, logprobs, tops)
            ]
        }


class TextOffsets:
    """Each token's first character in the text the ids decode to, over successive calls (a stream's chunks):
    a token that completes a character split over tokens starts where that character does, even when the
    character's first bytes came in an earlier chunk."""

    def __init__(self, texts: TokenTexts, start: int = 0):
        self.texts, self.at = texts, start
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> list[int]:
        out = []
        for i in ids:
            out.append(self.at)
            self.at += len(self.utf8.decode(self.texts.bytes(i)))
        return out
