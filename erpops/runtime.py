"""Process set-up done explicitly (never at import): offline hubs, no telemetry, quiet loggers."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "erpops,training,evaluation,registry,deployment,data_contracts",
    # stage functions also run outside flows (CLI, tests): their logs then stay local, without a warning
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # the temporary server of a first `erpops run` creates its database; Prefect's 20 s were seen to run out
    # on a slow 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # transformers (5.x, with its `kernels` dependency) swaps layers for kernels it resolves on the Hub at every
    # from_pretrained and model.train(); offline on a GPU that raised ("not available in the local cache")
    "USE_HUB_KERNELS": "NO",
}

COMPUTE_ENV = {
    # oneDNN's primitive cache and ideep's matmul cache keep up to 1024 entries each, and training's micro-batches
    # have a new token count each, so every entry is a shape never used again: 30 steps left ~700 MB of them
    # live after the train stage, in every later stage's peak. 128 still holds a micro-batch's shapes, which the
    # 30 layers share (capacity 0 is 5x slower): 446 tok/s against 372 over 16 steps, 331 MB left against 583.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128",
    "LRU_CACHE_CAPACITY": "128",
}
"""Compute-library settings for a run; read at their first use, so `setup_process` sets them in time."""


JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
            "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")
"""Where Debian (libjemalloc2), Fedora and Arch put jemalloc."""

JEMALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"
"""Freed pages go back to the system after a second, not ten: 30 training steps peak at 3.79 GB instead of 4.19
(glibc: 5.82). A MALLOC_CONF already set is kept."""

HEAVY_COMMANDS = frozenset({"run", "train", "optimize", "evaluate"})
"""CLI commands that train or score a model: they run under jemalloc where the system has it."""


def jemalloc_env(argv: list[str], env: dict[str, str], candidates: tuple[str, ...] = JEMALLOC) -> dict[str, str] | None:
    """The environment to re-run `argv` with jemalloc preloaded, or None to go on as is.

    glibc's malloc fragments over the training steps' varying tensor shapes: the default `erpops run` peaks at
    6.1 GiB with it and 3.85 GiB with jemalloc, at the same speed (README). Only the heavy commands, only
    where a jemalloc library exists, never twice, and never with ERPOPS_JEMALLOC=0."""
    if env.get("ERPOPS_JEMALLOC", "1") == "0" or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    if not any(a in HEAVY_COMMANDS for a in argv[1:2]):
        return None
    lib = next((c for c in candidates if Path(c).is_file()), None)
    if lib is None:
        return None
    return {**env, "LD_PRELOAD": " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p),
            "MALLOC_CONF": env.get("MALLOC_CONF", JEMALLOC_CONF)}


def setup_process(home: Path = Path(".erpops")) -> None:
    """Environment for a run: nothing reaches a model hub; evaluate caches modules under `home`."""
    for k, v in {**OFFLINE_ENV, **COMPUTE_ENV}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("HF_HOME", str((home / "hf").resolve()))
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    from erpops.allocator import keep_freed_memory

    keep_freed_memory()  # under jemalloc: freed pages stay for reuse while the process is under its budget
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store.db.utils", "great_expectations", "faiss", "faiss.loader",
                  "milvus_lite.server_manager"):  # it logs every start and stop of the embedded server
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path` (created with its folder) for the block: serialises processes on one machine.
    Not re-entrant: a second take in the same process waits on itself."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def git_commit() -> str:
    """HEAD of the working tree, with `-dirty` when it has uncommitted changes; `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
