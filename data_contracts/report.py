"""Violations and the validation report: every problem names its file, line and rule."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Violation:
    rule: str
    """Stable rule id, e.g. `json.parse` or `gx.expect_column_values_to_be_unique`."""
    file: str
    """File the problem is in."""
    line: int | None
    """1-based line (JSONL row, or line in a Markdown file); None for whole-file rules."""
    detail: str
    """What is wrong, in words."""
    severity: Severity = "error"
    """`error` blocks training; `warning` is reported only."""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: [{self.rule}] {self.detail}"


@dataclass
class ValidationReport:
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """Rows read per source."""
    gx_results: dict[str, dict] = field(default_factory=dict)
    """Great Expectations' own validation result per suite (JSON)."""

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "error_count": len(self.errors),
            "warning_count": len(self.violations) - len(self.errors),
            "counts": self.counts,
            "violations": [asdict(v) for v in self.violations],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def table(self, limit: int = 50) -> str:
        """A fixed-width table for terminals: severity, rule, file:line, detail."""
        if not self.violations:
            return "data contracts: all rules pass (" + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")"
        rows = [("severity", "rule", "where", "detail")]
        for v in self.violations[:limit]:
            rows.append((v.severity, v.rule, f"{v.file}:{v.line}" if v.line else v.file, v.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        out = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        if len(self.violations) > limit:
            out.append(f"... and {len(self.violations) - limit} more (use --json for all)")
        out.append(f"{len(self.errors)} error(s), {len(self.violations) - len(self.errors)} warning(s)")
        return "\n".join(out)


class DataContractError(Exception):
    """Raised when blocking rules fail; carries the report, and its message names file, row and rule."""

    def __init__(self, report: ValidationReport):
        self.report = report
        first = report.errors[:5]
        more = len(report.errors) - len(first)
        msg = "data contract failed:\n" + "\n".join(f"  {v}" for v in first)
        if more:
            msg += f"\n  ... and {more} more"
        super().__init__(msg)
