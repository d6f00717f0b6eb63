def test_phase_clock_adds_up_phases_shorter_than_its_rounding(monkeypatch):
    """A phase entered many times for a fraction of a millisecond each (a tiny model's per-layer solve) is the sum of
    its entries, not a sum of rounded zeros."""
    import erpops.summary as summary

    ticks = iter(i * 0.0004 for i in range(1000))  # every perf_counter call: 0.4 ms later
    monkeypatch.setattr(summary.time, "perf_counter", lambda: next(ticks))
    clock = summary.PhaseClock()
    for _ in range(10):
        with clock("solve"):
            pass
    with clock("other"):
        pass
    assert clock == {"solve": 0.004, "other": 0.0004}
    assert list(clock) == ["solve", "other"]  # in the order first run


def test_phase_clock_leaves_out_a_phase_timed_inside_another(monkeypatch):
    """The prune's forward counts the blocks' time without the solves its hooks run inside it."""
    import erpops.summary as summary

    ticks = iter([0.0, 1.0, 3.0, 10.0])  # forward starts, solve starts, solve ends, forward ends
    monkeypatch.setattr(summary.time, "perf_counter", lambda: next(ticks))
    clock = summary.PhaseClock()
    with clock("forward", excluding="solve"):
        with clock("solve"):
            pass
    assert clock == {"solve": 2.0, "forward": 8.0}
