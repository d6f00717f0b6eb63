"""Content-keyed step caching on Prefect's own cache: a stage reruns only when what it reads changed.

A stage's key is the sha256 of

- its content inputs: the dataset it reads (rows, or the raw files for validation), the recipe sections
  it uses, and the digests of the upstream artefacts it consumes (adapter files, the GGUF, the champion);
- the code version: a digest of the source of the packages the stage runs (not the git commit, so an
  edit to the README or to another stage does not retrain).

The policy plugs into `@task(cache_policy=...)`; Prefect stores the stage's return value under the key
(`result_storage`, a folder) and returns it as a `Cached` state on the next run with the same key. A
cached result names files (an adapter, a GGUF) in an earlier run folder, and those folders get rewritten (a rerun
under the same run name); so when the record is stored, the content of every file it names is recorded beside it
(`files/<key>.json`), and the record is used only while those files still hold that content. A record whose files
are gone or changed is not used: the key moves to its next generation and the stage runs again. A check that
cannot decide (the registry does not answer) raises and forgets nothing.

    from erpops.stage_cache import ContentKey
    policy = ContentKey("train", train_key_parts, ("training", "erpops"))
    train_task = policy.task(train, name="train")
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CODE_SUFFIXES = (".py", ".json", ".txt", ".yaml")


def digest_json(value: Any) -> str:
    """sha256 of a JSON-able value, independent of dict order (pydantic models via model_dump)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def digest_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_paths(paths: Iterable[Path]) -> str:
    """sha256 over files and folders (every file below, by relative name and content); a missing path counts
    as missing, so adding it later changes the digest."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            rel = f.relative_to(p) if p.is_dir() else Path(p.name)
            h.update(f"{rel}\0{digest_file(f) if f.exists() else 'missing'}\0".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_version(packages: tuple[str, ...]) -> str:
    """Digest of the source of these top-level packages of the checkout (cached per process)."""
    files = [f for pkg in sorted(packages) for f in sorted((ROOT / pkg).rglob("*"))
             if f.suffix in CODE_SUFFIXES and "__pycache__" not in f.parts]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(ROOT)}\0{digest_file(f)}\0".encode())
    return h.hexdigest()


def stage_key(stage: str, parts: dict[str, Any], packages: tuple[str, ...]) -> str:
    """The content key of one stage run (pure, given the code on disk)."""
    return digest_json({"stage": stage, "parts": parts, "code": code_version(tuple(packages))})


def paths_in(value: Any) -> list[Path]:
    """Every Path held by a (nested) dataclass, list, tuple or dict: the files a cached result depends on."""
    from dataclasses import fields, is_dataclass

    found: list[Path] = []
    if isinstance(value, Path):
        found.append(value)
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            found += paths_in(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            found += paths_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            found += paths_in(v)
    return found


def artefacts_exist(value: Any) -> bool:
    return all(p.exists() for p in paths_in(value))


def fingerprint(value: Any) -> dict[str, str]:
    """The content digest of every path a result names, by path (a missing path has its own digest)."""
    return {str(p): digest_paths([p]) for p in paths_in(value)}


@dataclass
class ContentKey(CachePolicy):
    """Prefect cache policy: the key comes from `parts(inputs)` and the code of `packages`, not from pickled
    inputs (a Tracker or a tokenizer would never hash the same twice) nor from the run id (Prefect's default
    policy includes it, so nothing is reused across runs)."""

    stage: str = ""
    parts: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    packages: tuple[str, ...] = ("erpops",)
    valid: Callable[[Any], bool] = artefacts_exist
    """Whether a stored result may still be used (default: every path it names exists). It returns False only
    for a definite "gone"; an error it raises means "cannot tell now" and reaches Prefect, which runs the stage
    without the cache and leaves the record and its generation as they were."""

    def task(self, fn: Callable[..., Any], **options: Any):
        """`prefect.task(fn, **options)` cached on this policy, recording the named files' content at store time
        (a task on this policy without the `record_files` hook never reuses a record that names files)."""
        from prefect import task

        cached = task(fn, cache_policy=self, persist_result=True, **options)
        record = functools.partial(ContentKey.record_files, self)
        record.log_on_run = False  # Prefect's switch for its own hooks: two log lines per stage run are noise
        cached.on_commit(record)
        return cached

    def record_files(self, txn) -> None:
        """Commit hook: write the fingerprint of the files the staged result names, next to the record."""
        basepath = getattr(getattr(txn.store, "result_storage", None), "basepath", None)
        record = getattr(txn, "_staged_value", None)
        if basepath is None or txn.key is None or record is None:
            return
        out = _files_record(basepath, txn.key)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fingerprint(getattr(record, "result", record)), sort_keys=True))

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        if self.parts is None:
            return None
        content = stage_key(self.stage, self.parts(inputs), self.packages)
        store = getattr(task_ctx, "result_store", None)
        basepath = getattr(getattr(store, "result_storage", None), "basepath", None)
        if basepath is None:
            return f"{self.stage}-{content}"
        generation_file = Path(basepath) / "generations" / f"{self.stage}-{content}"
        generation = int(generation_file.read_text()) if generation_file.exists() else 0
        key = f"{self.stage}-{content}-{generation}"
        if store.exists(key) and not self._usable(store, key, basepath):
            generation += 1
            generation_file.parent.mkdir(parents=True, exist_ok=True)
            generation_file.write_text(str(generation))
            log.info("%s: the cached result is gone or names files that changed; running the stage again", self.stage)
            key = f"{self.stage}-{content}-{generation}"
        return key

    def _usable(self, store, key: str, basepath) -> bool:
        try:
            result = store.read(key).result
        except Exception as e:  # an unreadable record (code moved, file truncated) is not reused
            log.info("%s: cached result %s unreadable (%s)", self.stage, key, e)
            return False
        return self.valid(result) and _files_unchanged(basepath, key, result)


def _files_record(basepath, key: str) -> Path:
    return Path(basepath) / "files" / f"{key}.json"


def _files_unchanged(basepath, key: str, result: Any) -> bool:
    """Whether the files `result` names still hold what they held when it was stored (a result that names no
    files needs no fingerprint)."""
    paths = paths_in(result)
    if not paths:
        return True
    recorded = _files_record(basepath, key)
    if not recorded.is_file():
        return False
    try:
        stored = json.loads(recorded.read_text())
    except ValueError:
        return False
    return stored == fingerprint(result)
