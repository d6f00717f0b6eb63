"""The run summary: every stage with status (ok / cached / failed / skipped + reason), duration and outputs."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
        lines = [f"{'stage':<15}{'status':<9}{'time':>8}  detail"]
        for s in self.stages.values():
            lines.append(f"{s.name:<15}{s.status:<9}{s.duration_s:>7.1f}s  {s.reason or ''}")
        return "\n".join(lines)
