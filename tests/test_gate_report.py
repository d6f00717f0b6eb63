"""The HTML gate report: one self-contained file, figures inline, data escaped."""

import base64
import re

import numpy as np
import pytest

from erpops.config import GateConfig
from evaluation.gate_report import module_means, render_gate_report
from evaluation.gates import decide

CFG = GateConfig(min_rouge_l=0.1, max_perplexity=100, bootstrap_samples=200)
MODULES = ("finance", "procurement", "inventory", "sales")
SCRIPT = "<script>alert('x')</script>"


def make_rows(shift: float = 0.0, n: int = 24, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"ex-{i:03d}", "module": MODULES[i % 4], "question": f"How do I post entry {i} & close?",
             "reference": f"Open screen {i} and press Save.", "answer": f"{SCRIPT} answer {i}",
             "rouge_l": float(rng.uniform(0.2, 0.6) + shift), "keyword_coverage": float(rng.uniform(0.3, 0.9)),
             "nll": float(rng.uniform(1.5, 3.0))} for i in range(n)]


def metrics(rows: list[dict]) -> dict[str, float]:
    return {"rouge_l": float(np.mean([r["rouge_l"] for r in rows])), "perplexity": 12.5, "examples": float(len(rows))}


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_against_a_champion(tmp_path):
    champ, cand = make_rows(), make_rows(shift=0.1)
    verdict = decide(metrics(cand), metrics(champ), CFG, cand, champ)
    assert verdict.verdict == "promote"
    path = render_gate_report(verdict, metrics(cand), metrics(champ), cand, champ, tmp_path / "out" / "gate.html")
    html = path.read_text(encoding="utf-8")
    assert "PROMOTE" in html and verdict.headline in html
    pngs = images(html)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)  # forest plot and module bars
    assert SCRIPT not in html and "&lt;script&gt;" in html and "&amp; close?" in html
    assert html.count("champion answer") == 1 and "procurement" in html
    assert "src=\"http" not in html and "<link" not in html  # nothing external


def test_report_without_a_champion(tmp_path):
    cand = make_rows()
    verdict = decide(metrics(cand), None, CFG)
    path = render_gate_report(verdict, metrics(cand), None, cand, None, tmp_path / "gate.html", title="<b>run</b>")
    html = path.read_text(encoding="utf-8")
    assert "promote" in html and "No comparison with a champion" in html
    assert len(images(html)) == 1  # module bars only
    assert SCRIPT not in html and "<b>run</b>" not in html and "&lt;b&gt;run&lt;/b&gt;" in html
    assert "champion answer" not in html


def test_rejected_candidate_report_names_the_failure(tmp_path):
    cand = make_rows()
    verdict = decide({**metrics(cand), "perplexity": 900.0}, None, CFG)
    html = render_gate_report(verdict, metrics(cand), None, cand, None, tmp_path / "gate.html").read_text()
    assert "REJECT" in html and "perplexity 900 &gt; ceiling 100" in html


def test_module_means_skip_rows_without_a_module_or_a_score():
    rows = [{"module": "finance", "rouge_l": 0.2}, {"module": "finance", "rouge_l": 0.4},
            {"module": "hr"}, {"rouge_l": 1.0}, {"module": "sales", "rouge_l": float("nan")}]
    assert module_means(rows, "rouge_l") == {"finance": pytest.approx(0.3)}
