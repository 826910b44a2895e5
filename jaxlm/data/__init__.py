"""Corpora, tokenizers and packed batches."""

from jaxlm.data.corpus import EMBEDDED, embedded_works, load_corpus
from jaxlm.data.loader import PackedLoader, eval_batches, pack_documents
from jaxlm.data.tokenizer import BPETokenizer, ByteTokenizer, DataError, build_tokenizer, load_tokenizer

__all__ = [
    "EMBEDDED",
    "BPETokenizer",
    "ByteTokenizer",
    "DataError",
    "PackedLoader",
    "build_tokenizer",
    "embedded_works",
    "eval_batches",
    "load_corpus",
    "load_tokenizer",
    "pack_documents",
]
