"""Retrieval for the chat: the environment's collection alias in Milvus, and the messages sent to the model.

The alias, not a collection, is queried, so a release switch (deployment/deploy.py) is picked up by the next
question. An embedded Milvus Lite file is opened per question and let go of at once (~15 ms once its server
runs), so `erpops deploy` in another process can still open it; a Milvus server URI works the same way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from deployment.milvus import alias_target, embedder_threshold, load_embedder, open_milvus, search


@dataclass(frozen=True)
class Source:
    doc: str
    title: str
    score: float
    text: str

    def public(self) -> dict:
        """What the API returns (the chunk text stays in the prompt and the trace)."""
        return {"doc": self.doc, "title": self.title, "score": round(self.score, 4)}


class Retriever:
    """Searches a collection with the embedder it was built with: each release records its own
    (`Release.embedding_model`), which a rollback or a canary across an embedder change brings back; `embedding_model`
    here is the recipe's, for a question whose release does not say. Embedders are loaded once each."""

    def __init__(self, uri: str, alias: str, embedding_model: str, k: int = 5, threshold: float | None = None):
        self.uri, self.alias, self.embedding_model, self.k = uri, alias, embedding_model, k
        self.configured_threshold = threshold
        self._embedders: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def threshold(self) -> float:
        """The recipe embedder's threshold."""
        return self.threshold_for(self.embedding_model)

    def threshold_for(self, embedding_model: str) -> float:
        return embedder_threshold(embedding_model, self.configured_threshold)

    def embedder(self, embedding_model: str | None = None):
        name = embedding_model or self.embedding_model
        with self._lock:
            if name not in self._embedders:
                self._embedders[name] = load_embedder(name)
            return self._embedders[name]

    def collection(self) -> str | None:
        """The collection the alias points at now (None: nothing released to this environment yet)."""
        with open_milvus(self.uri) as client:
            return alias_target(client, self.alias)

    def retrieve(self, question: str, collection: str | None = None,
                 embedding_model: str | None = None) -> tuple[list[Source], float | None]:
        """Chunks scoring at least the threshold, best first, and the best score seen (None: no collection).
        `collection`: search that collection (a canary release's) instead of the environment's alias;
        `embedding_model`: the embedder that collection was built with (None: the recipe's)."""
        name = embedding_model or self.embedding_model
        embedder, threshold = self.embedder(name), self.threshold_for(name)
        with open_milvus(self.uri) as client:
            if collection is None and alias_target(client, self.alias) is None:
                return [], None
            hits = search(client, collection or self.alias, embedder, question, limit=self.k,
                          fields=("doc", "title", "text"))
        top = max((h["score"] for h in hits), default=None)
        return [Source(h["doc"], h["title"], h["score"], h.get("text", "")) for h in hits if h["score"] >= threshold], top


def build_messages(system: str, history: list[dict], question: str, sources: list[Source],
                   images: list[str] | None = None) -> list[dict]:
    """System prompt with the retrieved documents, the kept conversation, then the question (with its images)."""
    content = system
    if sources:
        docs = "\n\n".join(f"[{i}] {s.title} ({s.doc})\n{s.text}" for i, s in enumerate(sources, 1))
        content += f"\n\nDocuments:\n{docs}"
    question_msg = {"role": "user", "content": question}
    if images:
        question_msg["images"] = list(images)
    return [{"role": "system", "content": content}, *history, question_msg]
