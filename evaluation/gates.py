"""The regression gate: a pure function from candidate (and champion) metrics to a verdict with reasons."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from erpops.config import GateConfig


@dataclass(frozen=True)
class Check:
    metric: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "promote" if self.passed else "reject"

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "verdict": self.verdict, "checks": [asdict(c) for c in self.checks]}


def decide(candidate: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig) -> GateVerdict:
    """Absolute floors always; against a champion, no regression beyond the tolerances.

    candidate/champion hold at least `rouge_l` (higher is better) and `perplexity` (lower is better).
    """
    import math

    checks: list[Check] = []
    rl, ppl = candidate.get("rouge_l", float("nan")), candidate.get("perplexity", float("nan"))
    ok = not math.isnan(rl) and rl >= cfg.min_rouge_l
    checks.append(Check("rouge_l", ok, f"rouge_l {rl:.4f} {'>=' if ok else '<'} floor {cfg.min_rouge_l}"))
    ok = not math.isnan(ppl) and ppl <= cfg.max_perplexity
    checks.append(Check("perplexity", ok, f"perplexity {ppl:.2f} {'<=' if ok else '>'} ceiling {cfg.max_perplexity}"))
    if champion:
        c_rl, c_ppl = champion.get("rouge_l"), champion.get("perplexity")
        if c_rl is not None:
            ok = rl >= c_rl - cfg.rouge_l_tolerance
            checks.append(Check("rouge_l_vs_champion", ok,
                                f"rouge_l {rl:.4f} vs champion {c_rl:.4f}: change {rl - c_rl:+.4f}, "
                                f"allowed drop {cfg.rouge_l_tolerance}"))
        if c_ppl is not None:
            ok = ppl <= c_ppl * (1 + cfg.perplexity_tolerance)
            checks.append(Check("perplexity_vs_champion", ok,
                                f"perplexity {ppl:.2f} vs champion {c_ppl:.2f}: ratio {ppl / c_ppl:.3f}, "
                                f"allowed {1 + cfg.perplexity_tolerance:.2f}"))
    else:
        checks.append(Check("champion", True, "no champion yet: absolute floors only"))
    return GateVerdict(all(c.passed for c in checks), checks)
