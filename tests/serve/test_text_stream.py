"""TextStream: token ids -> the text deltas a client is sent (incremental UTF-8, stop sequences held back)."""

from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.serve.choices import TextStream

TOK = ByteTokenizer()


def deltas(text_or_ids, stops=(), final=True):
    """Feeds one token at a time; returns the deltas and the stream."""
    ids = TOK.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    stream = TextStream(TOK, list(stops))
    out = [stream.feed([i]) for i in ids]
    if final:
        out.append(stream.feed([], final=True))
    return out, stream


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    out, _ = deltas("aé€")  # 1 + 2 + 3 bytes
    assert out == ["a", "", "é", "", "", "€", ""]


def test_invalid_bytes_become_replacement_characters_and_are_not_held_forever():
    out, _ = deltas([0x80] * 5 + [ord("z")], final=False)  # lone continuation bytes: invalid at once
    assert "".join(out) == "\ufffd" * 5 + "z" and all(len(d) == 1 for d in out)


def test_an_unfinished_character_is_flushed_as_a_replacement_at_the_end():
    out, _ = deltas([0xE2, 0x82])  # the first two bytes of "€"
    assert out == ["", "", "\ufffd"]


def test_tokens_without_text_send_nothing():
    out, stream = deltas([TOK.eos_id] * 3)
    assert out == [""] * 4 and not stream.stopped


def test_a_stop_sequence_is_held_back_excluded_and_ends_the_stream():
    out, stream = deltas("hello END world", stops=["END"])
    assert "".join(out) == "hello " and stream.stopped
    assert stream.feed(TOK.encode("more")) == ""  # nothing after the stop


def test_text_that_only_might_become_a_stop_is_sent_once_it_cannot():
    out, stream = deltas("aEbEN", stops=["END"], final=False)
    assert "".join(out) == "aEb"  # "EN" could still become "END"; the first "E" could not once "b" came
    assert stream.feed(TOK.encode("X")) == "ENX" and stream.feed([], final=True) == ""
    assert not stream.stopped


def test_the_earliest_of_several_stops_wins_even_within_one_feed():
    stream = TextStream(TOK, ["zz", "b"])
    assert stream.feed(TOK.encode("a b zz c")) == "a " and stream.stopped


def test_a_stop_split_over_a_multibyte_character():
    out, stream = deltas("x€y", stops=["€"])
    assert "".join(out) == "x" and stream.stopped
