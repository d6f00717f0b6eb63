"""The RAG knowledge base in Milvus (Milvus Lite embedded by default): one collection per release,
an alias that the RAG service queries, switched only after the new collection answers correctly.

Chunks follow the documents' `##` sections, split further to `chunk_chars` with overlap, and carry
the document title so a chunk can be understood alone. Vectors are unit-length embeddings from an embedder
shipped in a PyPI package (deploy.embedding_model; deployment.milvus.EMBEDDERS).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass

from deployment.milvus import (SCORE_THRESHOLD, alias_target, create_collection, embed, embedder_threshold,  # noqa: F401
                               load_embedder, open_milvus, search)
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
class KBBuild:
    """A release's collection, built, loaded and checked; no alias points at it yet."""

    uri: str
    collection: str
    rows: int
    embedding_model: str
    health_query: str
    health_hit: str
    retrieval: dict | None = None
    """hit@5 / MRR of the golden queries on this collection (evaluation.retrieval), when they were given."""
    seconds: dict | None = None
    """Where the time went: embed, insert (incl. flush and load), check."""


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


INSERT_BATCH = 256
"""Rows per insert call: a failure half-way leaves a partly filled collection, which is then dropped."""


def build_collection(cfg: DeployConfig, docs: list[dict], name: str, golden: list[dict] | None = None) -> KBBuild:
    """Write collection `name` in full, load it, check it answers a document's title with that document and
    score the golden queries on it (hit@5 and MRR at cfg.retrieval_threshold; below cfg.min_hit_at_5 it
    fails). Moves no alias. On any failure the collection is dropped, so no half-built one remains."""
    from evaluation.retrieval import score_collection

    chunks = chunk_docs(docs, cfg.chunk_chars, cfg.chunk_overlap)
    if not chunks:
        raise ValueError("no document chunks to index")
    t0 = time.perf_counter()
    embedder = load_embedder(cfg.embedding_model)
    vectors = embed(embedder, [c.text for c in chunks], document=True)
    seconds = {"embed": time.perf_counter() - t0}
    rows_out = [{"id": c.id, "doc": c.doc, "title": c.title, "module": c.module, "lang": c.lang, "text": c.text[:8000],
                 "embedding": v} for c, v in zip(chunks, vectors)]
    probe = docs[0]

    def check(client) -> dict | None:
        hits = search(client, name, embedder, probe["title"])
        if not hits or hits[0]["doc"] != probe["file"]:
            raise KBHealthError(f"{name}: query {probe['title']!r} did not return {probe['file']} first: {hits[:3]}")
        retrieval = (score_collection(client, name, embedder, golden, 5, embedder_threshold(cfg.embedding_model, cfg.retrieval_threshold))
                     if golden else None)
        if retrieval and retrieval["metrics"]["hit_at_5"] < cfg.min_hit_at_5:
            raise KBHealthError(f"{name}: hit@5 {retrieval['metrics']['hit_at_5']:.3f} on {len(golden)} golden queries "
                                f"is below deploy.min_hit_at_5 {cfg.min_hit_at_5}")
        return retrieval

    rows, retrieval, more = write_collection(cfg.milvus_uri, name, rows_out, check)
    seconds.update(more)
    log.info("knowledge base: %d chunks in %s, checked", rows, name)
    return KBBuild(cfg.milvus_uri, name, rows, cfg.embedding_model, probe["title"], probe["file"], retrieval,
                   {k: round(v, 3) for k, v in seconds.items()})


def write_collection(uri: str, name: str, rows: list[dict], check=None) -> tuple[int, object, dict]:
    """Create `name`, insert `rows` (with their vectors) in batches, flush, load, check the row count, then run
    `check(client)` (a health check; its result is returned). Any failure drops the collection: none is left
    half-built. A name that exists is refused: a release never writes into an existing collection."""
    seconds = {}
    with open_milvus(uri) as client:
        if client.has_collection(name):
            raise KBHealthError(f"collection {name} already exists; a release never writes into an existing collection")
        try:
            t0 = time.perf_counter()
            create_collection(client, name, len(rows[0]["embedding"]))
            for i in range(0, len(rows), INSERT_BATCH):
                client.insert(name, rows[i:i + INSERT_BATCH])
            client.flush(name)
            client.load_collection(name)
            seconds["insert"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stored = int(client.get_collection_stats(name)["row_count"])
            if stored != len(rows):
                raise KBHealthError(f"{name}: {stored} rows stored, {len(rows)} written")
            result = check(client) if check else None
            seconds["check"] = time.perf_counter() - t0
        except BaseException:
            if client.has_collection(name):
                client.drop_collection(name)
            raise
    return stored, result, seconds


def nearest_self_check(name: str, rows: list[dict]):
    """A check for a collection written from stored rows (no embedder needed): a row's own vector finds it first."""
    def check(client) -> None:
        probe = rows[0]
        client.load_collection(name)
        hits = client.search(name, data=[probe["embedding"]], limit=1, output_fields=["doc"],
                             search_params={"metric_type": "COSINE"})
        if not hits or not hits[0] or hits[0][0]["id"] != probe["id"]:
            raise KBHealthError(f"{name}: row {probe['id']} is not its own nearest neighbour")
    return check


def drop_collection(uri: str, name: str) -> bool:
    """Drop a collection no alias points at (cleanup of a release that did not switch); True if it was there."""
    with open_milvus(uri) as client:
        if not client.has_collection(name):
            return False
        aliases = client.list_aliases(collection_name=name).get("aliases", [])
        if aliases:
            raise KBHealthError(f"collection {name} is served by alias(es) {aliases}; not dropping it")
        client.drop_collection(name)
        return True


def collect_collections(uri: str, prefix: str, keep: set[str], keep_newest: int) -> list[str]:
    """Drop the collections named `<prefix>_*` that no alias points at, are not in `keep`, and are older than
    the newest `keep_newest` of them (names sort by release time). Returns the dropped names."""
    dropped = []
    with open_milvus(uri) as client:
        ours = sorted(c for c in client.list_collections() if c.startswith(f"{prefix}_"))
        served = {c for c in ours if client.list_aliases(collection_name=c).get("aliases")}
        for name in ours[: max(0, len(ours) - keep_newest)]:
            if name not in keep and name not in served:
                client.drop_collection(name)
                dropped.append(name)
    return dropped


def point_alias(uri: str, alias: str, collection: str) -> str | None:
    """Point the alias at a collection (which must exist and is loaded first); returns where it pointed before."""
    with open_milvus(uri) as client:
        if not client.has_collection(collection):
            raise KBHealthError(f"collection {collection} no longer exists; cannot point {alias} at it")
        client.load_collection(collection)
        before = alias_target(client, alias)
        if before is None:
            client.create_alias(collection, alias)
        elif before != collection:
            client.alter_alias(collection, alias)
        return before


def drop_alias(uri: str, alias: str) -> None:
    """Undo a first release: nothing served before it, so the alias goes away."""
    with open_milvus(uri) as client:
        if alias_target(client, alias) is not None:
            client.drop_alias(alias)
