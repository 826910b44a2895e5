"""`jaxlm serve`: the engine, its thread and the HTTP app under uvicorn.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, lets requests in flight finish for up to
`grace` seconds, then cancels the rest (each frees its slot); the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time

from jaxlm.engine import DecodeSteps, Engine
from jaxlm.serve.app import Service, create_app
from jaxlm.serve.model import Served
from jaxlm.serve.worker import EngineWorker

log = logging.getLogger(__name__)


def build_service(
    served: Served,
    *,
    slots: int = 8,
    chunk: int = 64,
    prefill_tokens: int = 1024,
    max_queue: int | None = None,
    queue_timeout: float = 30.0,
    draft=None,
    draft_tokens: int = 4,
    kv_tokens: int | None = None,
    warm_up_tokens: int = 256,
    warm_up_scoring: bool = False,
    release_model: bool = False,
) -> Service:
    """The engine over `slots` rows, compiled and running on its thread.

    draft: speculative decoding with a draft model or "ngram" (see `jaxlm.engine.DecodeSteps`).
    prefill_tokens: the most prompt tokens one prefill step takes (see `Engine`).
    kv_tokens: the KV budget in tokens (default: every slot's full context); the pool grows as it is used.
    warm_up_tokens: the steps are compiled before serving for rows of up to this many tokens (longer rows
      compile their shapes when they first occur). warm_up_scoring: also compile the steps that score prompts
      (echo + logprobs: lm-evaluation-harness's log-likelihoods; otherwise compiled when first used), and
      prefill in pieces of C / 4 tokens (prompt tails after prefix-cache hits pad to C / 4, not to C).
    release_model: drop `served.model` once the engine holds its weights (`Served.release_model`), before the
      warm-up, so the weights are in memory once."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    steps = DecodeSteps(served.model, prefix_lm=served.prefix_lm, draft=draft, draft_tokens=draft_tokens)
    if release_model:
        served.release_model()
    kv_blocks = None if kv_tokens is None else -(-int(kv_tokens) // steps.Z)
    # Short prefill chunks (scoring traffic) only with their warm-up: each shape of a real model holds tens of MB.
    engine = Engine(
        steps, slots=slots, chunk=chunk, kv_blocks=kv_blocks, prefill_tokens=prefill_tokens,
        short_chunks=warm_up_scoring,
    )  # fmt: skip
    t = time.perf_counter()
    engine.warm_up(warm_up_tokens, short_chunks=warm_up_scoring, score=warm_up_scoring)
    log.info(
        "compiled the steps for up to %d slots and %d tokens in %.1f s; KV pool %.0f MB of a %.0f MB budget",
        slots, warm_up_tokens, time.perf_counter() - t, engine.kv["kv_bytes"] / 2**20,
        engine.kv["kv_block_bytes"] * engine.budget / 2**20,
    )  # fmt: skip
    worker = EngineWorker(engine, max_queue=4 * slots if max_queue is None else max_queue).start()
    return Service(served, worker, queue_timeout=queue_timeout)


def _config(service: Service, host: str, port: int, grace: float, log_level: str):
    import uvicorn

    return uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=grace,
        lifespan="off",
        access_log=False,
    )


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0) -> None:
    """Serves until SIGTERM / SIGINT (see the module docstring)."""
    import uvicorn

    server = uvicorn.Server(_config(service, host, port, grace, "info"))
    # uvicorn re-raises the signal it shut down for, to the handler in place before it: make that one a no-op
    # so that a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        service.worker.stop()


def check_address(host: str, port: int) -> None:
    """ConfigError if host:port cannot be bound (in use, or not an address of this machine): before compiling."""
    from jaxlm.errors import ConfigError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(service: Service, *, port: int | None = None, grace: float = 2.0):
    """The server on 127.0.0.1 in a thread of this process (tests, benchmarks); yields its base URL and
    always stops it (and the engine thread)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(_config(service, "127.0.0.1", port, grace, "warning"))
    thread = threading.Thread(target=server.run, name="jaxlm-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.worker.stop()
