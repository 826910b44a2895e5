"""Continuous batching: requests join and leave a running batch between steps, over a paged KV cache.

Every row is one sequence with its own length and positions: its tokens are written at its own logical cache
slots, which live in KV blocks it holds (`jaxlm.ops.cache`: a pool of fixed-size blocks and a block table per
row, as in vLLM), so no row ever loses context because of another, a batch generates exactly what each
prompt would generate alone, and a step reads and writes only the blocks in use. Its steps:

- prefill (n, C): the next chunk of C prompt tokens of the n rows that are filling, so a long prompt is
  prefilled in chunks and decoding rows wait at most one chunk;
- decode (n, 1): one token for every decoding row;
- speculate (n, K + 1): with a draft, K drafted tokens per row verified in one pass.

Each runs on the block table (n, nb) of its rows: n and nb are powers of two (a row count up to N, the blocks
of the longest row), so a bounded set of shapes serves every mix of requests, each compiled once
(`Engine.warm_up` compiles those up to a length), and a step costs in proportion to the tokens in use.

A request leaves on a stop token, at its token limit, or when cancelled; its slot and blocks are free at the
next step. Sampling settings and seeds are per request: the i-th token of a request is drawn with
`fold_in(fold_in(PRNGKey(seed), stream), i)`, whatever else is in the batch.

When a row's cache is full (max_seq_len slots), its last `max_seq_len - window_shift` tokens are prefilled
again as a fresh context (positions restart at 0, in the blocks it holds), so generation never fails for
length and learned position tables are never indexed out of range; the other rows are not affected.

- `request`: `Request`, its sampling check and PRNG stream;
- `steps`: `DecodeSteps`, the compiled steps of one model, shared by every engine over it;
- `batcher`: `Engine`, the slots, blocks and scheduling.
"""

from jaxlm.engine.batcher import Engine, prompt_lookup
from jaxlm.engine.request import Request, check_sampling
from jaxlm.engine.steps import NO_BLOCK, DecodeSteps, Inputs

__all__ = ["NO_BLOCK", "DecodeSteps", "Engine", "Inputs", "Request", "check_sampling", "prompt_lookup"]
