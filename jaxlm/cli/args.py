"""The pieces every verb's arguments share: the parser, number and address types, draft options, logs."""

from __future__ import annotations

import argparse
import logging


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one `error:` line (plus where to look), before anything runs."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def number(kind, lo=None, hi=None, *, lo_open=False, what=None):
    """An argparse type: kind (int/float) within [lo, hi] ((lo, hi] with lo_open), with a message naming the bound."""
    low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    high = "" if hi is None else f"<= {hi}"
    rule = what or " and ".join(b for b in (low, high) if b)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if (
            value != value
            or (lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and value > hi)
        ):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def draft_options(p) -> None:
    p.add_argument(
        "--draft",
        metavar="RUN_DIR|HF_DIR|ngram",
        help="speculative decoding: a smaller model with the same tokenizer drafts tokens the model verifies "
        "(the same greedy output, the same sampling distribution), or ngram: prompt lookup",
    )
    p.add_argument("--draft-tokens", type=number(int, 1, 16), default=4, help="tokens drafted per step (4)")


def weights_option(p) -> None:
    p.add_argument(
        "--weights",
        choices=("stored", "f32", "bf16", "int8", "nf4"),
        help="store the weights for inference as bf16, int8 (one scale per output channel) or nf4 (4-bit "
        "NormalFloat); int8 and nf4 are dequantized inside the matmul, so a decoded token reads 1/4 or ~1/7 of "
        "the bytes of float32. f32: float32 laid out for the CPU decode kernels, the default on CPU for a "
        "float32 model; stored: as the model is stored (the default elsewhere)",
    )


def quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
