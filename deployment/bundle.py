"""Offline bundles: a release carried into a closed network as one file, verified byte for byte before it serves.

    erpops bundle export --release v3-20261204101500123 --out erp-v3.tar.gz
    erpops bundle import erp-v3.tar.gz --env prod --reason "CAB-150"

A bundle is a tar.gz of `manifest.json` (the release record, the embedding model and dimension, and the sha256
and size of every other file), `model.gguf`, `Modelfile` and `kb.jsonl` (the knowledge base's rows: text,
metadata and vectors, so the other side needs no embedding run). Import checks every file against the manifest,
the GGUF against the release's own sha256 and the manifest's Modelfile settings (what the Ollama model is created
from) against the checksummed Modelfile, before anything is written; a corrupted byte is refused with the file
named. Then it builds the collection from the rows, creates the Ollama model and switches the environment
like any release (deployment.deploy).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import fields
from pathlib import Path

from deployment.modelfile import ModelfileSpec
from deployment.releases import Release
from erpops.stage_cache import digest_file as _sha256

MANIFEST = "manifest.json"
FILES = ("model.gguf", "Modelfile", "kb.jsonl")
KB_FIELDS = ("id", "doc", "title", "module", "lang", "text", "embedding")


class BundleError(ValueError):
    """A bundle that is not what its manifest says; the message names the file."""


def collection_rows(uri: str, collection: str) -> list[dict]:
    """Every row of a collection, vectors included, in id order."""
    from deployment.milvus import open_milvus

    rows: list[dict] = []
    with open_milvus(uri) as client:
        client.load_collection(collection)
        it = client.query_iterator(collection, batch_size=500, filter="", output_fields=list(KB_FIELDS))
        while True:
            batch = it.next()
            if not batch:
                it.close()
                break
            rows += [{k: r[k] for k in KB_FIELDS} for r in batch]
    for r in rows:
        r["embedding"] = [float(x) for x in r["embedding"]]
    return sorted(rows, key=lambda r: r["id"])


def export_bundle(release: Release, gguf: Path, spec: ModelfileSpec, milvus_uri: str, out: Path) -> Path:
    """Write the bundle of `release` (its GGUF given, checked against the release's sha256) to `out`."""
    if _sha256(gguf) != release.gguf_sha256:
        raise BundleError(f"{gguf}: sha256 is not release {release.release_id}'s {release.gguf_sha256}")
    rows = collection_rows(milvus_uri, release.collection)
    if not rows:
        raise BundleError(f"collection {release.collection} of release {release.release_id} is empty or gone")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "Modelfile").write_text(spec.render("model.gguf"), encoding="utf-8")
        with open(t / "kb.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        files = {"model.gguf": gguf, "Modelfile": t / "Modelfile", "kb.jsonl": t / "kb.jsonl"}
        manifest = {"format": "erpops-bundle/1", "release": release.to_dict(),
                    "modelfile_spec": {"template": spec.template, "system": spec.system, "stop": list(spec.stop),
                                       "parameters": spec.parameters},
                    "kb": {"rows": len(rows), "dim": len(rows[0]["embedding"]), "embedding_model": release.embedding_model},
                    "files": {name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for name, p in files.items()}}
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            data = json.dumps(manifest, indent=2, ensure_ascii=False).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for name, p in files.items():
                tar.add(p, arcname=name)
        partial.replace(out)  # a bundle file exists only whole
    return out


def open_bundle(path: Path, dest: Path) -> tuple[Release, ModelfileSpec, dict, Path]:
    """Unpack and verify: every file present, its size and sha256 as the manifest says, the GGUF the release's, the
    manifest's Modelfile settings rendering to exactly the bundled Modelfile. Returns (release, Modelfile spec,
    manifest, folder). Raises BundleError naming the first bad file."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = tar.getnames()
            unexpected = [n for n in names if n not in (MANIFEST, *FILES)]
            if unexpected:
                raise BundleError(f"{path}: unexpected member(s) {unexpected}")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"{path}: not a readable tar.gz bundle ({e})") from None
    try:
        manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
        release = Release(**{f.name: manifest["release"][f.name] for f in fields(Release)})
        spec_d = manifest["modelfile_spec"]
        spec = ModelfileSpec(spec_d["template"], spec_d["system"], tuple(spec_d["stop"]), spec_d["parameters"])
        rendered = spec.render("model.gguf")
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{path}: {MANIFEST} is missing or damaged ({type(e).__name__}: {e})") from None
    for name in FILES:
        p = dest / name
        if name not in listed or not p.is_file():
            raise BundleError(f"{path}: {name} is missing")
        if (p.stat().st_size, _sha256(p)) != listed[name]:
            raise BundleError(f"{path}: {name} does not match its sha256 in {MANIFEST} (corrupted or altered); nothing imported")
    if listed["model.gguf"][1] != release.gguf_sha256:
        raise BundleError(f"{path}: model.gguf is not release {release.release_id}'s GGUF ({release.gguf_sha256})")
    differs = modelfile_difference(rendered, (dest / "Modelfile").read_bytes().decode("utf-8", errors="replace"))
    if differs:
        raise BundleError(f"{path}: {MANIFEST}'s modelfile_spec is not the bundled Modelfile ({differs}); "
                          "nothing imported")
    return release, spec, manifest, dest


def modelfile_difference(rendered: str, modelfile: str) -> str | None:
    """How the Modelfile a manifest's spec renders to differs from the bundled `modelfile` (lines only in one of
    them), or None when they are the same text. The Ollama model is created from the spec, and only the Modelfile
    is checksummed. Pure."""
    if rendered == modelfile:
        return None
    ours, theirs = rendered.splitlines(), modelfile.splitlines()
    only_spec = [line for line in ours if line not in theirs]
    only_file = [line for line in theirs if line not in ours]
    parts = [f"only in {MANIFEST}: {only_spec}" if only_spec else "",
             f"only in Modelfile: {only_file}" if only_file else ""]
    return "; ".join(p for p in parts if p) or "the same lines in another order or spacing"


def read_kb_rows(folder: Path) -> list[dict]:
    rows = []
    with open(folder / "kb.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                rows.append({k: row[k] for k in KB_FIELDS})
            except (ValueError, KeyError) as e:
                raise BundleError(f"{folder / 'kb.jsonl'}:{n}: not a knowledge-base row ({e})") from None
    return rows
