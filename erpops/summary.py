"""The run summary: every stage with status (ok / cached / failed / skipped + reason), duration and outputs."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from erpops.allocator import give_back
from erpops.tracking import write_json

RELEASE_STAGES = ("deploy_kb", "deploy_ollama", "switch")
"""The release flow's part: build the collection, prepare the Ollama model, switch the environment to both."""
STAGES = ("validate", "train", "optimize", "evaluate", "promote", *RELEASE_STAGES)


@dataclass
class StageRecord:
    name: str
    status: str = "pending"
    """pending, ok, cached (the stored result of an earlier run with the same key), failed or skipped."""
    reason: str | None = None
    duration_s: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    """Peak resident memory of this process while the stage ran (Linux: VmHWM, reset at the stage's start); or,
    when a child process (a training launch, the GGUF converter) set a new high for any child during the stage and
    it is higher, the child's. None where the peak cannot be reset (not Linux)."""


@dataclass
class RunSummary:
    run_dir: Path
    recipe: str
    mlflow_run_id: str | None = None
    stages: dict[str, StageRecord] = field(default_factory=lambda: {s: StageRecord(s) for s in STAGES})
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(s.status == "failed" for s in self.stages.values())

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage; an exception marks it failed (and propagates), otherwise it is ok."""
        rec = self.stages[name]
        t0 = time.perf_counter()
        children_before = _children_peak_mb()
        give_back()  # the pages the last stage freed and jemalloc still holds are not this stage's peak
        was_reset = reset_peak_rss()
        try:
            yield rec
        except BaseException as e:
            rec.status, rec.reason = "failed", f"{type(e).__name__}: {e}"
            raise
        else:
            if rec.status == "pending":
                rec.status = "ok"
        finally:
            rec.duration_s = round(time.perf_counter() - t0, 2)
            own, children = peak_rss_mb() if was_reset else None, _children_peak_mb()
            child = children if children > children_before else None
            peaks = [p for p in (own, child) if p is not None]
            rec.peak_rss_mb = round(max(peaks), 1) if peaks else None

    def memory_metrics(self) -> dict[str, float]:
        """Per-stage peak RSS as MLflow system metrics (the UI's System metrics tab), and the run's peak."""
        peaks = {f"system/peak_rss_megabytes_{s.name}": s.peak_rss_mb for s in self.stages.values()
                 if s.peak_rss_mb is not None and s.status == "ok"}
        return {**peaks, "system/peak_rss_megabytes": max(peaks.values())} if peaks else {}

    def skip_rest(self, reason: str) -> None:
        for rec in self.stages.values():
            if rec.status == "pending":
                rec.status, rec.reason = "skipped", reason

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "recipe": self.recipe,
            "run_dir": str(self.run_dir),
            "mlflow_run_id": self.mlflow_run_id,
            "stages": [asdict(s) for s in self.stages.values()],
            "outputs": self.outputs,
            "metrics": self.metrics,
        }

    @classmethod
    def read(cls, path: Path) -> "RunSummary":
        import json

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rs = cls(Path(data["run_dir"]), data["recipe"], data["mlflow_run_id"])
        rs.stages = {s["name"]: StageRecord(**s) for s in data["stages"]}
        rs.outputs, rs.metrics = data["outputs"], data["metrics"]
        return rs

    def write(self) -> Path:
        return write_json(self.run_dir / "run_summary.json", self.to_dict())

    def table(self) -> str:
        lines = [f"{'stage':<15}{'status':<9}{'time':>8}{'peak RSS':>11}  detail"]
        for s in self.stages.values():
            peak = f"{s.peak_rss_mb / 1024:.2f} GiB" if s.peak_rss_mb else "-"
            lines.append(f"{s.name:<15}{s.status:<9}{s.duration_s:>7.1f}s{peak:>11}  {s.reason or ''}")
        return "\n".join(lines)


class PhaseClock(dict):
    """Wall seconds per named phase of a stage (to the microsecond); `with clock("prune"):` adds the block's time to
    that phase. The sums are kept exact and only the values shown are rounded: a phase entered many times for less
    than the rounding step (a small model's per-layer solve) still adds up."""

    def __init__(self):
        super().__init__()
        self._exact: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str, excluding: str | None = None):
        """`excluding`: a phase timed inside this one, whose time is not counted twice (it stays its own)."""
        t0 = time.perf_counter()
        inner = self._exact.get(excluding, 0.0) if excluding else 0.0
        try:
            yield
        finally:
            inner = self._exact.get(excluding, 0.0) - inner if excluding else 0.0
            self._exact[phase] = self._exact.get(phase, 0.0) + time.perf_counter() - t0 - inner
            self[phase] = round(self._exact[phase], 6)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: "5" to /proc/self/clear_refs); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """This process's peak RSS since the last reset (VmHWM), in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _children_peak_mb() -> float:
    """The largest peak RSS of any finished child process (getrusage keeps a lifetime maximum), in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
