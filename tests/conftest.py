"""Shared fixtures: an offline process, a small corpus written per test, a tiny model, a fresh MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erpops.runtime import setup_process

REPO = Path(__file__).resolve().parents[1]
MODULES = ("finance", "procurement", "inventory", "sales", "production", "hr", "approvals", "admin")

setup_process(REPO / ".erpops")


def redis_up(host: str = "127.0.0.1", port: int = 6379) -> bool:
    """A Redis server answers there (this machine kind starts one before every session and CI run)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_corpus(root: Path, n_qa: int = 40, n_chat: int = 10) -> Path:
    """A small valid corpus in both languages, all modules, with one document per module."""
    qa = []
    for i in range(n_qa):
        m, ko = MODULES[i % 8], i % 2 == 0
        qa.append({"id": f"qa-{i:03d}", "module": m, "lang": "ko" if ko else "en",
                   "instruction": f"{m} 모듈에서 {i}번 작업은 어떻게 처리하나요?" if ko else f"How do I complete task {i} in {m}?",
                   "response": f"{m} 메뉴에서 {i}번 화면을 열고 저장을 누르세요." if ko else f"Open screen {i} in the {m} menu and press Save."})
    chats = [{"id": f"chat-{i:03d}", "module": MODULES[i % 8], "lang": "en",
              "messages": [{"role": "user", "content": f"Question {i} about the approval line"},
                           {"role": "assistant", "content": f"Answer {i}: set the approval line first."}]} for i in range(n_chat)]
    write_jsonl(root / "qa_pairs.jsonl", qa)
    write_jsonl(root / "chat_logs.jsonl", chats)
    docs = root / "erp_docs"
    docs.mkdir(parents=True, exist_ok=True)
    topics = {"finance": "journal entries and month-end closing", "procurement": "purchase orders and vendors",
              "inventory": "stock counts and warehouse transfers", "sales": "quotations and sales orders",
              "production": "bills of materials and work orders", "hr": "attendance, leave and payroll",
              "approvals": "approval lines and delegation", "admin": "user accounts and permissions"}
    for m, topic in topics.items():
        body = (f"## Overview\nThe {m} module covers {topic}. " + f"This guide explains {topic} step by step. " * 6 +
                f"\n\n## Steps\nOpen the {m} menu, fill in the {topic} form and save.\n")
        (docs / f"{m}_guide_en.md").write_text(f"---\ntitle: Guide to {topic}\nmodule: {m}\nlang: en\n---\n{body}", encoding="utf-8")
    return root


def data_cfg(root: Path, **kw):
    """DataConfig for a small test corpus (coverage minimum lowered to fit it)."""
    from erpops.config import DataConfig

    return DataConfig(root=root, **{"min_examples_per_module": 2, **kw})


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "erp")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from erpops.config import ModelConfig
    from training.base_model import resolve_base_model

    return Path(resolve_base_model(ModelConfig(source="tiny"), REPO / ".erpops" / "models"))


@pytest.fixture
def mlflow_settings(tmp_path, monkeypatch):
    from erpops.config import MLflowSettings

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "ERPOPS_REGISTERED_MODEL", "ERPOPS_ARTIFACT_LOCATION"):
        monkeypatch.delenv(var, raising=False)
    return MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "artifacts"))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    # Prefect's default 30 s ran out in a rehearsal on a slow 2-core machine while both test workers were busy
    with prefect_test_harness(server_startup_timeout=180):
        yield


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def erpops_cli(tmp_path: Path, cfg, settings, ollama_url: str):
    """`erpops ...` in a subprocess against a given store: a recipe whose deploy section names the Milvus file and
    the Ollama host, and an mlflow.yaml naming the tracking store (inherited MLFLOW_* variables dropped)."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\ndeploy:\n  milvus_uri: {cfg.milvus_uri}\n  ollama_host: {ollama_url}\n"
                      f"  chunk_chars: 400\n")
    mlflow_yaml = tmp_path / "mlflow.yaml"
    mlflow_yaml.write_text(f"tracking_uri: {settings.tracking_uri}\nartifact_location: {settings.artifact_location}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "erpops.cli", *args, "--recipe", str(recipe), "--mlflow-config",
                               str(mlflow_yaml)], capture_output=True, text=True, env=env, timeout=300)
    return cli
