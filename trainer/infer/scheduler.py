"""The server's scheduler: requests wait in a queue and run in batches on one engine thread.

Handlers submit `Sequence`s from the event loop; a single worker thread owns the model. When the
engine is free it takes every waiting sequence (up to `max_batch_size`), after waiting at most
`batch_wait_s` for a batch to fill, and runs them together: the transformers engine decodes them
as one padded batch, so 16 concurrent clients cost little more than one. Cancelled sequences
(clients that went away) are dropped from the queue before they run and leave a running batch at
the next step. `stop()` lets the queue drain before the worker exits (graceful shutdown).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from kubetune.trainer.infer.params import Event, Sequence

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full (HTTP 503: a client should retry, an autoscaler should add replicas)."""


class Scheduler:
    def __init__(self, engine: Any, *, max_batch_size: int = 16, batch_wait_s: float = 0.01, max_queue: int = 1024,
                 metrics: Any = None):
        self.engine = engine
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0
        self._thread = threading.Thread(target=self._loop, name="kubetune-scheduler", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking new work; let queued and running sequences finish (up to `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftovers = list(self._queue)
            self._queue.clear()
        for seq in leftovers:
            _finish(seq, "error", "the server is shutting down")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    # -- submission ------------------------------------------------------------------------
    def submit(self, sequences: list[Sequence]) -> None:
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len(self._queue) + len(sequences) > self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} sequences waiting)")
            self._queue.extend(sequences)
            self._update_gauges()
            self._cond.notify_all()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.running.set(self._running)

    # -- the worker ------------------------------------------------------------------------
    def _take_batch(self) -> list[Sequence] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            # A short window lets requests that arrive together run together.
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Sequence] = []
            while self._queue and len(batch) < self.max_batch_size:
                seq = self._queue.popleft()
                if seq.cancelled.is_set():
                    _finish(seq, "cancelled")
                    self._count_cancelled([seq])
                    continue
                batch.append(seq)
            self._running = len(batch)
            self._update_gauges()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
            try:
                self.engine.run(batch)
            except Exception as exc:  # one bad batch must not kill the server
                log.exception("generation failed")
                for seq in batch:
                    if seq.finish_reason is None:
                        _finish(seq, "error", f"{type(exc).__name__}: {exc}")
            finally:
                self._count_cancelled(batch)
                with self._cond:
                    self._running = 0
                    self._update_gauges()

    def _count_cancelled(self, sequences: list[Sequence]) -> None:
        if self.metrics is not None:
            cancelled = sum(1 for seq in sequences if seq.finish_reason == "cancelled")
            if cancelled:
                self.metrics.cancelled.inc(cancelled)


def _finish(seq: Sequence, reason: str, error: str | None = None) -> None:
    seq.finish_reason = reason
    if seq.emit is not None:
        seq.emit(Event(finish_reason=reason, error=error))
