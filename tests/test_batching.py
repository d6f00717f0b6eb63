"""Dynamic batching: the window's timing rule with a fake clock, and the batcher's threads for real."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batching import BatchWindow, DynamicBatcher


def test_a_window_is_due_when_full_or_when_its_oldest_has_waited_long_enough():
    w = BatchWindow(max_batch=32, max_wait_s=0.1)
    assert w.wait_s(0.0) is None and not w.due(0.0)
    w.add(10.0)
    w.add(10.05)
    assert not w.due(10.099) and w.wait_s(10.05) == pytest.approx(0.05)
    assert w.due(10.1) and w.wait_s(10.1) == 0.0
    assert w.take(10.1) == 2 and w.size == 0 and w.opened_at is None


def test_a_full_window_goes_at_once_and_the_rest_opens_a_new_one():
    w = BatchWindow(max_batch=32, max_wait_s=0.1)
    for i in range(40):
        w.add(5.0 + i * 0.001)
    assert w.due(5.0) and w.take(5.04) == 32
    assert w.size == 8 and w.opened_at == 5.04 and not w.due(5.1) and w.due(5.14)


def test_concurrent_requests_share_batches_and_each_gets_its_own_result():
    batcher = DynamicBatcher(lambda items: [x * 10 for x in items], max_batch=32, max_wait_s=0.2)
    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(batcher.submit, range(64)))
        assert results == [x * 10 for x in range(64)]
        assert sum(batcher.batches) == 64 and max(batcher.batches) <= 32 and len(batcher.batches) < 64
    finally:
        batcher.close()


def test_a_lone_request_waits_for_the_window_then_goes_alone():
    batcher = DynamicBatcher(lambda items: list(items), max_batch=32, max_wait_s=0.05)
    try:
        t0 = time.monotonic()
        assert batcher.submit("x") == "x"
        assert time.monotonic() - t0 >= 0.05 and batcher.batches == [1]
    finally:
        batcher.close()


def test_an_error_of_the_batch_reaches_every_member():
    def boom(items):
        raise ValueError(f"model down ({len(items)} waiting)")

    batcher = DynamicBatcher(boom, max_batch=4, max_wait_s=0.05)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(batcher.submit, i) for i in range(4)]
        for f in futures:
            with pytest.raises(ValueError, match="model down"):
                f.result()
    finally:
        batcher.close()


def test_close_sends_what_waits():
    gate = threading.Event()
    batcher = DynamicBatcher(lambda items: gate.wait(5) and list(items), max_batch=32, max_wait_s=10.0)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batcher.submit, i) for i in range(2)]
        time.sleep(0.05)
        gate.set()
        batcher.close()
        assert sorted(f.result(timeout=5) for f in futures) == [0, 1]
