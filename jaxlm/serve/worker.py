"""The engine's thread: steps the continuous-batching `Engine` while requests are active, and tells each
request's listener (from that thread) when it is admitted, gets tokens or finishes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import jax

from jaxlm.engine import Engine, Request

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: the caller answers 503."""


class EngineWorker:
    def __init__(self, engine: Engine, *, max_queue: int):
        """max_queue: requests that may wait for a slot; more are refused (`Busy`)."""
        self.engine, self.max_queue = engine, max_queue
        self._listeners: dict[Request, Callable[[Request], None]] = {}  # by identity (Request has eq=False)
        self.failed: str | None = None  # set when the engine could not even be reset: nothing more is served
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="jaxlm-engine", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def submit(self, requests: list[Request], listener: Callable[[Request], None]) -> None:
        """Queues requests (all or none); listener(request) runs on the engine thread after each change."""
        with self._wake:
            if self.failed is not None:
                raise Busy(f"the engine has failed ({self.failed}); restart the server")
            if self._stop:
                raise Busy("the server is shutting down")
            if len(self.engine.queue) + len(requests) > self.max_queue + self.engine.free_slots:
                raise Busy(f"all {self.engine.N} slots are busy and {len(self.engine.queue)} requests are waiting")
            # Listening first: the engine thread may admit and finish a request as soon as it is queued.
            for r in requests:
                self._listeners[r] = listener
            done = []
            try:
                for r in requests:
                    done.append(self.engine.submit(r))
            except ValueError:
                for r in done:
                    self.engine.cancel(r)
                for r in requests:
                    self._listeners.pop(r, None)
                raise
            self._wake.notify()

    def cancel(self, requests: list[Request]) -> None:
        with self._wake:
            for r in requests:
                if not r.done:
                    self.engine.cancel(r)
            self._wake.notify()

    def stop(self) -> None:
        """Ends every request still running ("cancelled") and stops the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()

    @property
    def load(self) -> dict:
        e = self.engine
        load = {
            "status": "ok" if self.failed is None and self._thread.is_alive() else "error",
            "slots": e.N,
            "running": sum(s is not None for s in e.slots),
            "queued": len(e.queue),
            # the bytes of the weights the engine reads (with `--weights`, their codes and scales)
            "weight_bytes": sum(a.nbytes for a in jax.tree.leaves(getattr(e.steps, "weights", None))),
            **e.kv,
        }
        if e.steps.draft is not None:
            load["speculative"] = dict(e.stats)
        return load

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.engine.active:
                    self._wake.wait()
                if self._stop:
                    self._tell(self._abort("cancelled"))
                    return
            try:
                changed = self.engine.step()
            except Exception:  # a failed step must not take the server down: its requests fail, others go on
                log.exception("decode step failed; ending the requests in flight")
                changed = self._abort("error")
            self._tell(changed)
            if self.failed is not None:
                return

    def _abort(self, reason: str) -> list[Request]:
        """engine.abort; if even that fails, the worker is failed: every request it knows of ends with "error"
        and later submissions are refused (the health check reports it)."""
        try:
            return self.engine.abort(reason)
        except Exception as e:
            log.exception("the engine could not be reset; refusing all further requests")
            with self._wake:
                self.failed = f"{type(e).__name__}: {e}"
                ended = list(self._listeners)
            for r in ended:
                if not r.done:
                    r.finish_reason = "error"
            return ended

    def _tell(self, requests: list[Request]) -> None:
        for r in requests:
            with self._wake:
                listener = self._listeners.pop(r, None) if r.done else self._listeners.get(r)
            if listener is not None:
                try:
                    listener(r)
                except Exception:  # a listener whose client has gone must not stop the engine
                    log.exception("request listener failed")
