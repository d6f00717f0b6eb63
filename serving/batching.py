"""Dynamic batching in front of a model: requests that arrive close together are answered as one batch, sent
when `max_batch` (32) requests wait or `max_wait_s` (100 ms) after the first of them, whichever comes first (the
seeds' figures). Callers block on their own result; an error of the batch is every member's error.

    batcher = DynamicBatcher(lambda items: [answer(i) for i in items])
    batcher.submit(item)      # from many threads; returns this item's result

The timing rule is `BatchWindow`, a small pure state machine (tested with a fake clock); `DynamicBatcher` adds a
thread and a condition variable around it.
"""

from __future__ import annotations

import threading
import time
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
    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 32, max_wait_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, name: str = "batcher"):
        self.run_batch, self.clock = run_batch, clock
        self.window = BatchWindow(max_batch, max_wait_s)
        self.batches: list[int] = []
        """Sizes of the batches sent, in order (for metrics and tests)."""
        self._queue: list[_Pending[T]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T, timeout_s: float | None = None) -> R:
        pending = _Pending(item)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(pending)
            self.window.add(self.clock())
            self._cond.notify()
        return pending.future.result(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._queue:
                        return
                    wait = self.window.wait_s(self.clock())
                    if wait == 0.0 or (self._closed and self._queue):
                        break
                    self._cond.wait(wait)
                n = self.window.take(self.clock())
                if self._closed:
                    n = len(self._queue)
                batch, self._queue = self._queue[:n], self._queue[n:]
            self._run(batch)

    def _run(self, batch: list[_Pending[T]]) -> None:
        self.batches.append(len(batch))
        try:
            results = list(self.run_batch([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except BaseException as e:  # every caller of the batch gets the error
            for p in batch:
                p.future.set_exception(e)
            return
        for p, r in zip(batch, results):
            p.future.set_result(r)

    def close(self) -> None:
        """Send what waits, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
