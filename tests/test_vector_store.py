"""Knowledge base on Milvus Lite (real, embedded): chunks, search, alias switch, failure leaves alias alone."""

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
def test_release_switches_alias_and_failed_health_leaves_it(tmp_path, monkeypatch):
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200)
    r1 = V.deploy_knowledge_base(cfg, DOCS, "v1")
    assert r1.collection == "kb_v1" and r1.previous_collection is None
    assert r1.rows == len(V.chunk_docs(DOCS, cfg.chunk_chars, cfg.chunk_overlap))

    with V.open_milvus(cfg.milvus_uri) as client:
        embedder = V.load_embedder(cfg.embedding_model)
        assert V.alias_target(client, "kb") == "kb_v1"
        hits = V.search(client, "kb", embedder, "How do I move stock to another warehouse?")
        assert hits[0]["doc"] == "inventory_transfer_en.md" and hits[0]["score"] > 0.3

    r2 = V.deploy_knowledge_base(cfg, DOCS, "v2")
    assert r2.previous_collection == "kb_v1"

    # a release whose health query misses must not move the alias, and leaves no collection behind
    monkeypatch.setattr(V, "search", lambda *a, **k: [{"doc": "wrong.md", "title": "x", "score": 0.1}])
    with pytest.raises(V.KBHealthError):
        V.deploy_knowledge_base(cfg, DOCS, "v3")
    with V.open_milvus(cfg.milvus_uri) as client:
        assert V.alias_target(client, "kb") == "kb_v2"
        assert not client.has_collection("kb_v3")

    V.point_alias(cfg.milvus_uri, "kb", "kb_v1")
    with V.open_milvus(cfg.milvus_uri) as client:
        assert V.alias_target(client, "kb") == "kb_v1"
    with pytest.raises(V.KBHealthError, match="no longer exists"):
        V.point_alias(cfg.milvus_uri, "kb", "kb_v9")


@pytest.mark.integration
def test_redeploying_the_serving_release_never_drops_it_and_first_release_revert_drops_the_alias(tmp_path):
    from deployment.deploy import revert_knowledge_base

    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200)
    first = V.deploy_knowledge_base(cfg, DOCS, "v1")
    again = V.deploy_knowledge_base(cfg, DOCS, "v1")  # e.g. `erpops deploy` of the current champion
    assert again.collection != "kb_v1" and again.previous_collection == "kb_v1"
    with V.open_milvus(cfg.milvus_uri) as client:
        assert client.has_collection("kb_v1") and V.alias_target(client, "kb") == again.collection
    revert_knowledge_base(again)
    with V.open_milvus(cfg.milvus_uri) as client:
        assert V.alias_target(client, "kb") == "kb_v1"
    revert_knowledge_base(first)  # a failed first release: nothing served before it
    with V.open_milvus(cfg.milvus_uri) as client:
        assert V.alias_target(client, "kb") is None


def test_chunk_overlap_must_be_smaller_than_the_chunk():
    with pytest.raises(ValueError, match="chunk_overlap"):
        DeployConfig(chunk_chars=200, chunk_overlap=200)


@pytest.mark.integration
def test_golden_queries_are_scored_before_the_alias_moves_and_a_floor_blocks_a_bad_release(tmp_path):
    golden = [{"id": "g1", "lang": "en", "query": "How do I move stock to another warehouse?",
               "relevant_doc": "inventory_transfer_en.md"},
              {"id": "g2", "lang": "en", "query": "Who approves annual leave?", "relevant_doc": "hr_leave_en.md"}]
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), collection_alias="kb", chunk_chars=200, retrieval_threshold=0.3)
    r1 = V.deploy_knowledge_base(cfg, DOCS, "v1", golden)
    m = r1.retrieval["metrics"]
    assert m["hit_at_5"] == 1.0 and m["mrr"] == 1.0 and m["queries"] == 2
    assert [q["rank"] for q in r1.retrieval["per_query"]] == [1, 1]

    # the same questions pointed at documents that are not there: hit@5 0, below the floor, nothing serves
    wrong = [{**g, "relevant_doc": "missing.md"} for g in golden]
    strict = cfg.model_copy(update={"min_hit_at_5": 0.5})
    with pytest.raises(V.KBHealthError, match="hit@5 0.000"):
        V.deploy_knowledge_base(strict, DOCS, "v2", wrong)
    with V.open_milvus(cfg.milvus_uri) as client:
        assert V.alias_target(client, "kb") == "kb_v1" and not client.has_collection("kb_v2")
