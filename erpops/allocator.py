"""Freed memory kept for reuse up to a resident budget, under jemalloc (`erpops.runtime.jemalloc_env`).

A training step or a scoring batch frees gigabytes of activations and allocates them again a moment later. Under
jemalloc's decay (`dirty_decay_ms`) the freed pages go back to the kernel within the decay time, and the next
batch takes each page again as a fresh zeroed page: millions of minor page faults, a third to a half of a
scoring pass on a 2-core machine. Never giving pages back (`dirty_decay_ms:-1`) removes the faults but lets
the process grow by what jemalloc cannot reuse (4.4 GB instead of 2.3 for ten training steps).

`resident_budget` does what neither setting does: freed pages stay with the process while its resident memory
is under a budget; once it passes the budget, a watcher thread gives every freed page back at once (jemalloc's
`arena.<all>.purge`), the way a decay of zero would, and keeping resumes. Without jemalloc (glibc's malloc, or
`ERPOPS_JEMALLOC=0`) it does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import threading
import time
from dataclasses import dataclass

ARENAS_ALL = 4096
"""jemalloc's MALLCTL_ARENAS_ALL: `arena.4096.*` addresses every arena."""
PAGE = os.sysconf("SC_PAGE_SIZE")


class Jemalloc:
    """The few `mallctl` calls used here, on the jemalloc this process runs under."""

    def __init__(self, lib: ctypes.CDLL):
        self._mallctl = lib.mallctl
        self._mallctl.restype = ctypes.c_int

    @classmethod
    def loaded(cls) -> Jemalloc | None:
        """The process's jemalloc, or None when malloc is another allocator's."""
        try:
            lib = ctypes.CDLL(None)
            lib.mallctl  # noqa: B018 - only jemalloc exports it
        except (OSError, AttributeError):
            return None
        return cls(lib)

    def _read(self, name: str, ctype):
        value, size = ctype(), ctypes.c_size_t(ctypes.sizeof(ctype))
        rc = self._mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
        if rc:
            raise OSError(rc, f"mallctl {name}")
        return value.value

    def _write(self, name: str, ctype, value) -> int:
        v = ctype(value)
        return self._mallctl(name.encode(), None, None, ctypes.byref(v), ctypes.c_size_t(ctypes.sizeof(ctype)))

    def arenas(self) -> int:
        return self._read("arenas.narenas", ctypes.c_uint)

    def dirty_decay_ms(self) -> int:
        """The default for arenas created from now on (`opt.dirty_decay_ms` unless changed)."""
        return self._read("arenas.dirty_decay_ms", ctypes.c_ssize_t)

    def set_dirty_decay_ms(self, ms: int) -> None:
        """Every existing arena's, and the default for new ones (-1: freed pages are never given back alone)."""
        if self._write("arenas.dirty_decay_ms", ctypes.c_ssize_t, ms):
            raise OSError(f"mallctl arenas.dirty_decay_ms={ms} refused")
        for i in range(self.arenas()):
            self._write(f"arena.{i}.dirty_decay_ms", ctypes.c_ssize_t, ms)  # EFAULT: arena not created yet

    def purge(self) -> None:
        """Give every freed page of every arena back to the kernel now."""
        self._mallctl(f"arena.{ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))


def give_back() -> None:
    """Return every freed page to the kernel now, under jemalloc (nothing otherwise): a stage boundary, so that
    what one stage freed is not counted in the next one's peak."""
    if (je := Jemalloc.loaded()) is not None:
        je.purge()


def resident_bytes(fd: int) -> int:
    """The process's resident set from an open /proc/self/statm (its second field, in pages)."""
    return int(os.pread(fd, 128, 0).split()[1]) * PAGE


@dataclass
class BudgetStats:
    purges: int = 0
    """How often the resident set passed the budget and freed pages went back."""
    decay_before_ms: int = 0
    """jemalloc's `dirty_decay_ms` before the block, back in place after it."""


@contextlib.contextmanager
def resident_budget(budget_bytes: int, interval_s: float = 0.01, min_gap_s: float = 0.1):
    """Within the block, freed memory stays with the process until its resident set passes `budget_bytes`,
    then it all goes back at once (see the module docstring). Yields a `BudgetStats`, or None where the process
    does not run under jemalloc (nothing changes then). On exit the previous decay is back and the freed
    pages are given back. The watcher reads /proc/self/statm every `interval_s` and purges at most every
    `min_gap_s`: where live memory alone passes the budget, freed pages go back within that time, as a short
    decay would return them."""
    je = Jemalloc.loaded()
    if je is None or budget_bytes <= 0:
        yield None
        return
    stats = BudgetStats(decay_before_ms=je.dirty_decay_ms())
    stop = threading.Event()
    fd = os.open("/proc/self/statm", os.O_RDONLY)

    def watch() -> None:
        last = 0.0
        while not stop.wait(interval_s):
            # at most every `min_gap_s`: where live memory alone is over the budget, no worse than a short decay
            if resident_bytes(fd) > budget_bytes and (now := time.monotonic()) - last >= min_gap_s:
                je.purge()
                stats.purges += 1
                last = now

    je.set_dirty_decay_ms(-1)
    watcher = threading.Thread(target=watch, name="erpops-resident-budget", daemon=True)
    watcher.start()
    try:
        yield stats
    finally:
        stop.set()
        watcher.join()
        os.close(fd)
        je.set_dirty_decay_ms(stats.decay_before_ms)
        je.purge()


DEFAULT_BUDGET_GIB = 3.0
"""Under the 4 GiB a default `erpops run` must stay within, with room for what a stage allocates between two
looks of the watcher; a stage whose live memory alone passes it gets its freed pages back within 0.1 s."""

_process_budget: contextlib.ExitStack | None = None


def keep_freed_memory(env: dict[str, str] | None = None) -> BudgetStats | None:
    """Start `resident_budget` for the rest of the process (once; later calls return None): the budget is
    ERPOPS_RESIDENT_BUDGET_GIB (GiB, default DEFAULT_BUDGET_GIB; 0 keeps jemalloc's own decay)."""
    global _process_budget
    env = os.environ if env is None else env
    raw = env.get("ERPOPS_RESIDENT_BUDGET_GIB", str(DEFAULT_BUDGET_GIB))
    try:
        gib = float(raw)
    except ValueError:
        raise ValueError(f"ERPOPS_RESIDENT_BUDGET_GIB={raw!r} is not a number of GiB (e.g. 3.0; 0 turns the budget "
                         f"off)") from None
    if not gib >= 0:
        raise ValueError(f"ERPOPS_RESIDENT_BUDGET_GIB={raw!r}: the budget cannot be negative (0 turns it off)")
    if _process_budget is not None:
        return None
    stack = contextlib.ExitStack()
    stats = stack.enter_context(resident_budget(int(gib * 2**30)))
    if stats is None:
        stack.close()
        return None
    _process_budget = stack
    atexit.register(stack.close)
    # a forked child has no watcher thread: it goes back to jemalloc's decay rather than keep every page
    os.register_at_fork(after_in_child=lambda: _child_after_fork(stats.decay_before_ms))
    return stats


def _child_after_fork(decay_ms: int) -> None:
    global _process_budget
    if _process_budget is not None and (je := Jemalloc.loaded()) is not None:
        je.set_dirty_decay_ms(decay_ms)
    _process_budget = None
