"""erpops.allocator: freed pages kept under a resident budget, given back past it (real jemalloc, in a child)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from erpops.allocator import resident_budget
from erpops.runtime import JEMALLOC

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from erpops.allocator import Jemalloc, resident_budget, resident_bytes

MB = 2**20
fd = os.open("/proc/self/statm", os.O_RDONLY)
je = Jemalloc.loaded()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def take(mb):  # activation-sized blocks, written (a block of hundreds of MB would be mapped apart)
    return [np.ones(MB, np.uint8) for _ in range(mb)]

def churn():  # 400 MB taken, written and freed, twice: the second time's page faults are what is measured
    a = take(400); del a
    time.sleep(0.2)
    f0 = faults()
    a = take(400); del a
    return faults() - f0

out = {"decay_conf": je.dirty_decay_ms(), "plain_refaults": churn()}
base = resident_bytes(fd)
with resident_budget(base + 700 * MB) as stats:
    out["kept_refaults"] = churn()
    out["kept_mb"] = (resident_bytes(fd) - base) / MB
    out["decay_inside"] = je.dirty_decay_ms()
    a, b = take(400), take(400)  # 800 MB live: past the budget
    del a, b
    time.sleep(0.3)
    out["after_budget_mb"] = (resident_bytes(fd) - base) / MB
    out["purges"] = stats.purges
out["decay_after"] = je.dirty_decay_ms()
print("PROBE " + json.dumps(out))
"""


@pytest.mark.parametrize("value, says", [("3GB", "not a number of GiB"), ("-1", "cannot be negative")])
def test_a_malformed_budget_setting_is_a_clear_error(value, says):
    from erpops.allocator import keep_freed_memory

    with pytest.raises(ValueError, match=f"ERPOPS_RESIDENT_BUDGET_GIB='{value}'.*{says}"):
        keep_freed_memory({"ERPOPS_RESIDENT_BUDGET_GIB": value})


def test_without_jemalloc_nothing_changes():
    with resident_budget(2**30) as stats:  # the test process runs on glibc's malloc
        assert stats is None


@pytest.mark.skipif(not any(Path(p).is_file() for p in JEMALLOC), reason="no jemalloc library on this system")
def test_freed_pages_are_kept_under_the_budget_and_given_back_past_it():
    """Under jemalloc with decay 0 (every freed page back at once), 400 MB of 1 MB blocks written again costs
    ~100k page faults; inside the budget the freed pages stay and cost almost none, and 800 MB live passes the budget: once
    freed, they go back. On exit jemalloc's own setting is back."""
    lib = next(p for p in JEMALLOC if Path(p).is_file())
    env = {**os.environ, "LD_PRELOAD": lib, "MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], env=env, capture_output=True, text=True,
                          timeout=120)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PROBE ")), None)
    assert line, proc.stderr[-3000:]
    got = json.loads(line[6:])
    pages = 400 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert got["decay_conf"] == 0 and got["decay_inside"] == -1 and got["decay_after"] == 0
    assert got["plain_refaults"] > 0.9 * pages  # decay 0: every page taken again from the kernel
    assert got["kept_refaults"] < 0.1 * pages  # kept: the same pages reused
    assert got["kept_mb"] > 300
    assert got["purges"] >= 1 and got["after_budget_mb"] < 100, got
