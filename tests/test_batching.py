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
        assert time.monotonic() - t0 >= 0.05 and list(batcher.batches) == [1] and batcher.sent == 1
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


def test_a_slow_batch_holds_back_no_batch_sent_after_it():
    release, started = threading.Event(), threading.Event()

    def run(items):
        if "slow" in items:  # a long answer, or a provider hanging until its timeout
            started.set()
            release.wait(10)
        return list(items)

    batcher = DynamicBatcher(run, max_batch=32, max_wait_s=0.01)
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(batcher.submit, "slow")
            assert started.wait(5)
            assert batcher.submit("fast", timeout_s=2) == "fast"
            assert not held.done()
            release.set()
            assert held.result(timeout=5) == "slow"
        assert list(batcher.batches) == [1, 1]
    finally:
        release.set()
        batcher.close()


def test_at_most_max_in_flight_batches_run_and_due_requests_wait_for_a_slot_together():
    release, lock = threading.Event(), threading.Lock()
    running, peak = [0], [0]

    def run(items):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return list(items)

    def until(condition, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        return condition()

    batcher = DynamicBatcher(run, max_batch=32, max_wait_s=0.01, max_in_flight=2)
    try:
        with ThreadPoolExecutor(5) as pool:
            first = [pool.submit(batcher.submit, "a")]
            assert until(lambda: running[0] == 1)
            first.append(pool.submit(batcher.submit, "b"))
            assert until(lambda: running[0] == 2)
            waiting = [pool.submit(batcher.submit, x) for x in "cde"]
            time.sleep(0.2)  # many windows long: they are due, but both slots are taken
            assert batcher.sent == 2 and not any(f.done() for f in waiting)
            release.set()
            assert [f.result(timeout=5) for f in first + waiting] == list("abcde")
        assert list(batcher.batches) == [1, 1, 3] and peak[0] == 2
    finally:
        release.set()
        batcher.close()


def test_close_waits_for_the_batches_in_flight():
    release, started, ended = threading.Event(), threading.Event(), threading.Event()

    def run(items):
        started.set()
        release.wait(5)
        ended.set()
        return list(items)

    batcher = DynamicBatcher(run, max_wait_s=0.01)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(batcher.submit, 1)
        assert started.wait(5)
        closer = threading.Thread(target=batcher.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive() and not held.done()
        release.set()
        closer.join(5)
        assert not closer.is_alive() and ended.is_set() and held.result(timeout=5) == 1
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(2)


def test_the_record_of_batch_sizes_is_bounded():
    batcher = DynamicBatcher(lambda items: list(items), max_batch=1, max_wait_s=1.0)
    try:
        for i in range(1100):
            batcher.submit(i)
        assert batcher.sent == 1100 and len(batcher.batches) == 1024 and set(batcher.batches) == {1}
    finally:
        batcher.close()
