"""Dynamic batching in front of a model: requests that arrive close together are answered as one batch, sent
when `max_batch` (32) requests wait or `max_wait_s` (100 ms) after the first of them, whichever comes first (the
seeds' figures). Callers block on their own result; an error of the batch is every member's error.

    batcher = DynamicBatcher(lambda items: [answer(i) for i in items])
    batcher.submit(item)      # from many threads; returns this item's result

The timing rule is `BatchWindow`, a small pure state machine (tested with a fake clock); `DynamicBatcher` adds a
thread that forms the batches and a condition variable around it. Each batch runs on a thread of its own, so a slow
one (a long answer, a provider hanging until its timeout) holds back no batch sent after it; at most
`max_in_flight` run at once (Ollama batches concurrent requests itself, up to its OLLAMA_NUM_PARALLEL).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchWindow:
    """When the requests waiting now should go: the batch is full, or the oldest has waited max_wait_s."""

    max_batch: int = 32
    max_wait_s: float = 0.1
    opened_at: float | None = None
    size: int = 0

    def add(self, now: float) -> None:
        if self.size == 0:
            self.opened_at = now
        self.size += 1

    def due(self, now: float) -> bool:
        return self.size >= self.max_batch or (self.size > 0 and now >= self.opened_at + self.max_wait_s)

    def wait_s(self, now: float) -> float | None:
        """Seconds until the window is due (0: now); None while nothing waits."""
        if self.size == 0:
            return None
        return 0.0 if self.due(now) else self.opened_at + self.max_wait_s - now

    def take(self, now: float) -> int:
        """How many go now (at most max_batch); the rest open a new window at `now`."""
        n = min(self.size, self.max_batch)
        self.size -= n
        self.opened_at = now if self.size else None
        return n


@dataclass
class _Pending(Generic[T]):
    item: T
    future: Future = field(default_factory=Future)


class DynamicBatcher(Generic[T, R]):
    """Requests from many threads answered in batches (the `BatchWindow` rule). A due batch goes to a thread of its
    own while the window goes on filling; while `max_in_flight` batches run, due requests wait, and join the next
    batch, until one of them ends."""

    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 32, max_wait_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, name: str = "batcher", max_in_flight: int = 8):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.run_batch, self.clock, self.name, self.max_in_flight = run_batch, clock, name, max_in_flight
        self.window = BatchWindow(max_batch, max_wait_s)
        self.batches: deque[int] = deque(maxlen=1024)
        """Sizes of the last 1024 batches sent, oldest first (for metrics and tests)."""
        self.sent = 0
        """Batches sent since the batcher started."""
        self._queue: list[_Pending[T]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._in_flight = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T, timeout_s: float | None = None) -> R:
        pending = _Pending(item)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(pending)
            self.window.add(self.clock())
            self._cond.notify_all()
        return pending.future.result(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._queue:
                        return
                    wait = self.window.wait_s(self.clock())
                    due = wait == 0.0 or (self._closed and bool(self._queue))
                    if due and self._in_flight < self.max_in_flight:
                        break
                    self._cond.wait(None if due else wait)  # due but every slot busy: until a batch ends
                n = self.window.take(self.clock())
                if self._closed:
                    n = len(self._queue)
                batch, self._queue = self._queue[:n], self._queue[n:]
                self._in_flight += 1
                self.batches.append(len(batch))
                self.sent += 1
            try:
                threading.Thread(target=self._run, args=(batch,), name=f"{self.name}-batch", daemon=True).start()
            except RuntimeError as e:  # no thread to be had: this batch fails, the batcher goes on
                self._end(batch, error=e)

    def _run(self, batch: list[_Pending[T]]) -> None:
        try:
            results = list(self.run_batch([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except BaseException as e:  # every caller of the batch gets the error
            self._end(batch, error=e)
            return
        self._end(batch, results)

    def _end(self, batch: list[_Pending[T]], results: Sequence[R] = (), error: BaseException | None = None) -> None:
        """Each member gets its result (or the batch's error), and the batch's slot is free again."""
        try:
            for i, p in enumerate(batch):
                if error is None:
                    p.future.set_result(results[i])
                else:
                    p.future.set_exception(error)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what waits, then wait for every batch in flight to end (at most `timeout_s` in all); later
        submits raise RuntimeError."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0, max(0.0, deadline - time.monotonic()))
