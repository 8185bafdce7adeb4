"""The server's scheduler: requests wait in a queue; one engine thread decodes them in batches.

Handlers submit `Sequence`s from the event loop; a single worker thread owns the model.

With an engine that supports it (the transformers engine without speculative decoding) scheduling
is iteration-level (continuous batching, as in Orca and vLLM): the worker runs one decode step at
a time for the running batch and, before every step, admits waiting sequences into the free slots
(up to `max_batch_size` running). A request that arrives while others are generating starts at
the next step, and a finished or cancelled sequence frees its slot at once. When the batch is
empty the worker waits for work, then up to `batch_wait_s` more for requests that arrive together.

Other engines (speculative decoding, vLLM's offline engine) run whole batches: whatever is waiting
when the engine is free, up to `max_batch_size`, through `engine.run()`.

`call(fn)` runs `fn` on the worker thread between two steps (runtime adapter loads and unloads
change the model, which must not happen during a forward pass); `release_adapters` on the engine,
when it has one, is told which adapters the queued and running sequences still use.

Cancelled sequences (clients that went away) are dropped from the queue before they run and leave
a running batch at the next step. `stop()` lets queued and running sequences finish before the
worker exits (graceful shutdown).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any

from kubetune.trainer.serve.params import Event, Sequence

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
        self._tasks: collections.deque[tuple[Any, concurrent.futures.Future]] = collections.deque()
        self._in_batch: list[Sequence] = []
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
        with self._cond:
            tasks = list(self._tasks)
            self._tasks.clear()
        for _, future in tasks:
            future.cancel()

    # -- work on the engine thread ---------------------------------------------------------
    def call(self, fn: Any) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread before the next decode step; its result (or
        exception) comes back through the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            self._tasks.append((fn, future))
            self._cond.notify_all()
        return future

    def _run_tasks(self) -> None:
        while True:
            with self._cond:
                if not self._tasks:
                    break
                fn, future = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        release = getattr(self.engine, "release_adapters", None)
        if release is not None and getattr(self.engine, "retired_adapters", None):
            with self._cond:
                in_use = {seq.adapter for seq in self._queue}
            release(in_use | {seq.adapter for seq in self._in_batch})

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

    # -- taking work -----------------------------------------------------------------------
    def _take(self, room: int, *, wait: bool) -> list[Sequence] | None:
        """Up to `room` waiting sequences (cancelled ones are finished and skipped). With `wait`
        (nothing is running) block until work arrives, then give requests that arrive together a
        short window to join; returns None once stopping with nothing left to do."""
        with self._cond:
            if wait:
                while not self._queue:
                    if self._stopping:
                        return None
                    if self._tasks:
                        return []
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._queue) < room and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            taken: list[Sequence] = []
            while self._queue and len(taken) < room:
                seq = self._queue.popleft()
                if seq.cancelled.is_set():
                    _finish(seq, "cancelled")
                    self._count_cancelled([seq])
                    continue
                taken.append(seq)
            self._update_gauges()
            return taken

    def _set_running(self, count: int) -> None:
        with self._cond:
            self._running = count
            self._update_gauges()

    # -- the worker ------------------------------------------------------------------------
    def _loop(self) -> None:
        batch = self.engine.open_batch()
        if batch is None:
            self._loop_whole_batches()
        else:
            self._loop_continuous(batch)

    def _loop_continuous(self, batch: Any) -> None:
        """Iteration-level scheduling: admit waiting sequences before every decode step."""
        while True:
            self._in_batch = batch.sequences
            self._run_tasks()
            room = self.max_batch_size - len(batch) if batch.can_admit else 0
            new = self._take(room, wait=not batch) if room else []
            if new is None:
                return
            if new:
                try:
                    batch.admit(new)
                except Exception as exc:  # the newcomers' prefill failed; the running rows are intact
                    log.exception("prefill failed")
                    for seq in new:
                        if seq.finish_reason is None:
                            _finish(seq, "error", f"{type(exc).__name__}: {exc}")
                self._count_cancelled([seq for seq in new if seq.finish_reason is not None])
            if not batch:
                continue
            self._set_running(len(batch))
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
            running = batch.sequences
            try:
                batch.advance()
                self._set_running(len(batch))  # finished rows have left: their slots are free now
                batch.forward()
            except Exception as exc:  # one failed step must not kill the server
                log.exception("generation failed")
                batch.fail_all(f"{type(exc).__name__}: {exc}")
            self._count_cancelled([seq for seq in running if seq.finish_reason is not None])
            self._set_running(len(batch))

    def _loop_whole_batches(self) -> None:
        """Engines without a running batch: take what waits, run it to the end, repeat."""
        while True:
            self._in_batch = []
            self._run_tasks()
            batch = self._take(self.max_batch_size, wait=True)
            if batch is None:
                return
            if not batch:
                continue
            self._set_running(len(batch))
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
                self._set_running(0)

    def _count_cancelled(self, sequences: list[Sequence]) -> None:
        if self.metrics is not None:
            cancelled = sum(1 for seq in sequences if seq.finish_reason == "cancelled")
            if cancelled:
                self.metrics.cancelled.inc(cancelled)


def _finish(seq: Sequence, reason: str, error: str | None = None) -> None:
    seq.finish_reason = reason
    if seq.emit is not None:
        seq.emit(Event(finish_reason=reason, error=error))
