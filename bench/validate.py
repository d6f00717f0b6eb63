"""Benchmark: validate N synthetic QA rows through every data contract; how much of it is GX.

    .venv/bin/python bench/validate.py            # 100,000 rows (goal: under 20 s on 2 cores)
    .venv/bin/python bench/validate.py --rows 20000

Prints a table and, as its last line, name=value pairs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = ("finance", "procurement", "inventory", "sales", "production", "hr", "approvals", "admin")
KO_VERBS = ["등록", "수정", "조회", "승인", "취소", "마감", "이관", "정산"]
EN_VERBS = ["register", "change", "look up", "approve", "cancel", "close", "transfer", "settle"]
KO_OBJ = ["구매요청", "전표", "재고", "출하", "작업지시", "휴가", "결재선", "사용자 권한"]
EN_OBJ = ["purchase request", "journal entry", "stock item", "shipment", "work order", "leave request",
          "approval line", "user role"]


def synth(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        m = MODULES[i % 8]
        if i % 2:
            v, o = rng.choice(EN_VERBS), rng.choice(EN_OBJ)
            ins = f"How do I {v} a {o} number {i} in the {m} module?"
            res = f"Open {m.title()} > {o.title()}, find record {i}, choose {v.title()} and save. Item {rng.randint(1, 999)}."
            lang = "en"
        else:
            v, o = rng.choice(KO_VERBS), rng.choice(KO_OBJ)
            ins = f"{m} 모듈에서 {o} {i}번을 {v}하려면 어떻게 하나요?"
            res = f"{o} 화면에서 {i}번을 선택하고 {v} 버튼을 누른 뒤 저장하세요. 항목 {rng.randint(1, 999)}."
            lang = "ko"
        rows.append({"id": f"qa-{i:07d}", "module": m, "lang": lang, "instruction": ins, "response": res})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()

    from erpops.runtime import setup_process

    setup_process()
    from data_contracts import contracts
    from erpops.config import DataConfig

    gx_time = 0.0
    real_run_suite = contracts.run_suite

    def timed_run_suite(*a, **k):
        nonlocal gx_time
        t = time.perf_counter()
        try:
            return real_run_suite(*a, **k)
        finally:
            gx_time += time.perf_counter() - t

    real_context = contracts._gx_context

    def timed_context():  # GX's import and context set-up count as GX time
        nonlocal gx_time
        t = time.perf_counter()
        try:
            return real_context()
        finally:
            gx_time += time.perf_counter() - t

    contracts.run_suite = timed_run_suite
    contracts._gx_context = timed_context
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with open(root / "qa_pairs.jsonl", "w", encoding="utf-8") as f:
            for r in synth(args.rows):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (root / "chat_logs.jsonl").write_text(json.dumps({"id": "c1", "module": "hr", "lang": "en", "messages": [
            {"role": "user", "content": "How do I apply for leave?"},
            {"role": "assistant", "content": "Open HR > Leave and submit the form."}]}) + "\n", encoding="utf-8")
        (root / "erp_docs").mkdir()
        (root / "erp_docs" / "hr_en.md").write_text("---\ntitle: Leave\nmodule: hr\nlang: en\n---\n" + "Leave rules. " * 20)
        cfg = DataConfig(root=root, min_examples_per_module=1)
        t0 = time.perf_counter()
        report, _, ds = contracts.check_corpus(cfg)
        total = time.perf_counter() - t0
    print(f"{'rows':<28}{args.rows:>12,}")
    print(f"{'total seconds':<28}{total:>12.2f}")
    print(f"{'GX seconds':<28}{gx_time:>12.2f}")
    print(f"{'GX share':<28}{gx_time / total:>12.1%}")
    print(f"{'rows per second':<28}{args.rows / total:>12,.0f}")
    print(f"{'violations (warnings)':<28}{len(report.violations):>12,}")
    print(f"{'blocked':<28}{str(ds is None):>12}")
    print(f"rows={args.rows} seconds={total:.2f} gx_seconds={gx_time:.2f} gx_share={gx_time / total:.3f} "
          f"rows_per_s={args.rows / total:.0f}")


if __name__ == "__main__":
    main()
