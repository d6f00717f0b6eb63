"""A served world for the service tests: a real MLflow registry (sqlite) with versions 1 and 2, two real releases
to staging (Milvus Lite collections + Ollama tags on the test double), staging serving v2 with v1 previous, and
the service over them with a viewer, an operator and an admin key.

    with served_world(tmp_path) as w:
        w.client.get("/api/v1/ai-models/list", headers=w.auth("viewer"))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from ollama_double import OllamaDouble
from test_ollama import fake_gguf
from test_vector_store import DOCS

from deployment import deploy as D
from deployment.modelfile import CHATML_TEMPLATE, ModelfileSpec
from erpops.config import DeployConfig, MLflowSettings

NAME = "erp-assistant"
SPEC = ModelfileSpec(template=CHATML_TEMPLATE, system="sys", stop=("<|im_end|>",), parameters={})


@dataclass
class World:
    root: Path
    double: OllamaDouble
    cfg: DeployConfig
    mlflow: MLflowSettings
    service: object
    app: object
    client: object
    keys: dict = field(default_factory=dict)
    releases: dict = field(default_factory=dict)

    def auth(self, role: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def build_registry(root: Path, double: OllamaDouble) -> tuple[DeployConfig, MLflowSettings, dict]:
    import mlflow

    settings = MLflowSettings(tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_location=str(root / "artifacts"))
    client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
    client.create_registered_model(settings.registered_model_name)
    cfg = DeployConfig(milvus_uri=str(root / "kb.db"), ollama_host=double.url, chunk_chars=400,
                       health_max_latency_s=30, ollama_timeout_s=30)
    releases = {}
    for v in ("1", "2"):
        client.create_model_version(settings.registered_model_name, source=str(root))
        client.set_model_version_tag(settings.registered_model_name, v, "gate_verdict", "promote")
        client.set_model_version_tag(settings.registered_model_name, v, "dataset_digest", f"data-{v}")
        out = D.release_version(cfg, settings, "staging", v, fake_gguf(root, f"v{v}"), SPEC, DOCS, None, "tester")
        releases[v] = out.release
    return cfg, settings, releases


@contextlib.contextmanager
def served_world(root: Path, **serve):
    """Everything above, torn down on exit (the double stops, environment variables restored)."""
    import pytest
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.service import Service
    from serving.settings import ServeSettings

    with pytest.MonkeyPatch.context() as mp, OllamaDouble() as double:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "ERPOPS_REDIS_URL"):
            mp.delenv(var, raising=False)
        cfg, settings, releases = build_registry(root, double)
        serve_settings = ServeSettings(data_dir=root / "serving", env="staging", **serve)
        service = Service.from_settings(serve_settings, deploy=cfg, mlflow=settings)
        app = create_app(service)
        with TestClient(app, raise_server_exceptions=False) as client:
            world = World(root, double, cfg, settings, service, app, client, releases=releases)
            for role in ("viewer", "operator", "admin"):
                world.keys[role], _ = service.keys.create(f"{role}-key", role)
            yield world


@contextlib.contextmanager
def live_server(app):
    """The app on a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="erpops-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
