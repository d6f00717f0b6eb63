"""Benchmark: where a release's time goes (upload, create, health, knowledge-base build, switch), and how fast
the knowledge base is built against the embedder alone.

    .venv/bin/python bench/release.py                 # sample corpus x2, a 145 MB GGUF-sized file, ~1 min
    .venv/bin/python bench/release.py --repeat 10 --gguf .erpops/runs/<run>/gguf/model-q8_0.gguf

Ollama: a real server at OLLAMA_HOST when one answers (then give a real --gguf), else the in-process test double
of tests/ollama_double.py (it stores the blob and answers canned text, so upload/create measure our client and
the HTTP path, not Ollama's own GGUF parsing). Milvus: an embedded Milvus Lite file in a temporary folder. Prints a
table and, as its last line, name=value pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="copies of the sample documents (distinct files)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF to release (default: a synthetic file of --gguf-mb)")
    ap.add_argument("--gguf-mb", type=int, default=145, help="size of the synthetic file (the default Q8_0 is 145 MB)")
    args = ap.parse_args()

    from erpops.runtime import setup_process

    setup_process(REPO / ".erpops")
    from data_contracts.loaders import load_markdown_docs
    from deployment.deploy import release_version
    from deployment.milvus import embed, load_embedder
    from deployment.modelfile import CHATML_TEMPLATE, ModelfileSpec
    from deployment.ollama_deploy import ollama_host, reachable
    from deployment.vector_store import chunk_docs
    from erpops.config import DeployConfig, MLflowSettings

    work = Path(tempfile.mkdtemp(prefix="bench-release-"))
    rows, _ = load_markdown_docs(REPO / "data" / "erp" / "erp_docs")
    base = [r.data for r in rows]
    docs = [{**d, "file": f"{i}-{d['file']}"} for i in range(args.repeat) for d in base]
    gguf = args.gguf
    if gguf is None:
        gguf = work / "model.gguf"
        with open(gguf, "wb") as f:
            f.write(b"GGUF")
            block = os.urandom(1 << 20)
            for _ in range(args.gguf_mb):
                f.write(block)
    spec = ModelfileSpec(CHATML_TEMPLATE, None, ("<|im_end|>",), {})

    host = ollama_host(None)
    double = None
    if not reachable(host):
        from ollama_double import OllamaDouble

        double = OllamaDouble()
        host = double.url
    cfg = DeployConfig(milvus_uri=str(work / "kb.db"), ollama_host=host)
    settings = MLflowSettings(tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_location=str(work / "art"))

    embedder = load_embedder(cfg.embedding_model)
    chunks = chunk_docs(docs, cfg.chunk_chars, cfg.chunk_overlap)
    t0 = time.perf_counter()
    embed(embedder, [c.text for c in chunks], document=True)
    raw_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = release_version(cfg, settings, "staging", "1", gguf, spec, docs, None, "bench")
    wall = time.perf_counter() - t0
    s = out.seconds
    kb_s = s["kb"]
    parts = [("knowledge base: embed", s.get("kb_embed", 0.0)), ("knowledge base: insert+load", s.get("kb_insert", 0.0)),
             ("knowledge base: check", s.get("kb_check", 0.0)), ("ollama: upload (sha256 checked)", s.get("ollama_upload", 0.0)),
             ("ollama: create", s.get("ollama_create", 0.0)), ("ollama: health (2 prompts)", s.get("ollama_health", 0.0)),
             ("switch (alias, tags, registry)", s.get("switch", 0.0))]
    print(f"{'part':<34}{'seconds':>9}")
    for name, sec in parts:
        print(f"  {name:<32}{sec:>9.2f}")
    print(f"{'release, wall':<34}{wall:>9.2f}")
    print(f"docs {len(docs)}, chunks {len(chunks)}, GGUF {gguf.stat().st_size / 2**20:.0f} MB "
          f"({'synthetic' if args.gguf is None else gguf}), Ollama: {'test double' if double else host}")
    print(f"{'embedding alone':<34}{raw_s:>9.2f}   {len(docs) / raw_s:.1f} docs/s")
    print(f"{'knowledge-base build':<34}{kb_s:>9.2f}   {len(docs) / kb_s:.1f} docs/s")
    if double:
        double.stop()
    print(f"release_s={wall:.2f} upload_s={s.get('ollama_upload', 0):.2f} create_s={s.get('ollama_create', 0):.2f} "
          f"health_s={s.get('ollama_health', 0):.2f} kb_s={kb_s:.2f} switch_s={s.get('switch', 0):.2f} "
          f"kb_docs_per_s={len(docs) / kb_s:.1f} embed_docs_per_s={len(docs) / raw_s:.1f} "
          f"kb_over_embed={raw_s / kb_s:.3f} docs={len(docs)} chunks={len(chunks)} ollama={'double' if double else 'server'}")


if __name__ == "__main__":
    main()
