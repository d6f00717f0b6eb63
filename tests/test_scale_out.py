"""Scale-out on existing engines, for real: the Prefect server on PostgreSQL and the MLflow tracking server on
PostgreSQL (this machine kind runs PostgreSQL on 127.0.0.1:5432), the tiny pipeline run against both."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, make_corpus

PG = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")


def _pg():
    try:
        import psycopg2

        conn = psycopg2.connect(connect_timeout=3, **PG)
    except Exception as e:  # noqa: BLE001 - any failure to connect means: no server here
        pytest.skip(f"no PostgreSQL at {PG['host']}:{PG['port']} ({type(e).__name__}: {e})")
    conn.autocommit = True
    return conn


def _query(db: str, sql: str):
    import psycopg2

    with psycopg2.connect(**{**PG, "dbname": db}) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_on_prefect_and_mlflow_servers_backed_by_postgresql(tmp_path):
    admin = _pg()
    suffix = uuid.uuid4().hex[:8]
    prefect_db, mlflow_db = f"erpops_prefect_{suffix}", f"erpops_mlflow_{suffix}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {prefect_db}")
        cur.execute(f"CREATE DATABASE {mlflow_db}")
    corpus = make_corpus(tmp_path / "erp")
    recipe = (REPO / "recipes" / "tiny" / "test.yaml").read_text()
    recipe = (recipe.replace("root: data/erp", f"root: {corpus}")
              .replace("output_root: .erpops/runs", f"output_root: {tmp_path / 'runs'}")
              .replace("milvus_uri: .erpops/milvus.db", f"milvus_uri: {tmp_path / 'milvus.db'}"))
    (tmp_path / "tiny.yaml").write_text(recipe)
    (tmp_path / "mlflow.yaml").write_text(f"artifact_location: {tmp_path / 'artifacts'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               OLLAMA_HOST="http://127.0.0.1:9")
    home = tmp_path / "stack"

    def erpops(*args, timeout=900):
        return subprocess.run([sys.executable, "-m", "erpops.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=timeout)

    try:
        up = erpops("up", "--home", str(home), "--no-worker", "--mlflow-config", str(tmp_path / "mlflow.yaml"),
                    "--prefect-port", "0", "--mlflow-port", "0",
                    "--prefect-db", f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}",
                    "--mlflow-backend", f"postgresql://postgres@127.0.0.1:5432/{mlflow_db}", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        exports = next(line for line in up.stdout.splitlines() if line.startswith("export "))
        env.update(dict(kv.split("=", 1) for kv in exports[len("export "):].split()))
        assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")

        run = erpops("run", "--recipe", str(tmp_path / "tiny.yaml"), "--mlflow-config", str(tmp_path / "mlflow.yaml"),
                     "--run-name", "pg")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((tmp_path / "runs" / "pg" / "run_summary.json").read_text())
        assert summary["ok"] and summary["outputs"]["model_version"] == "1"

        # the state is in PostgreSQL: Prefect's flow runs (the pipeline and its two subflows) and MLflow's registry
        flows = dict(_query(prefect_db, "SELECT f.name, count(*) FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                                        "WHERE r.state_type = 'COMPLETED' GROUP BY f.name"))
        assert flows == {"erpops-pipeline": 1, "train-and-gate": 1, "release": 1}
        assert _query(mlflow_db, "SELECT name, version FROM model_versions") == [("erp-assistant", 1)]
        assert ("champion", 1) in _query(mlflow_db, "SELECT alias, version FROM registered_model_aliases")
    finally:
        erpops("down", "--home", str(home))
        with admin.cursor() as cur:
            for db in (prefect_db, mlflow_db):
                cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()


KB_FROM_ANOTHER_PROCESS = r"""
import json, sys
from erpops.config import DeployConfig
from deployment.deploy import _unload_idle
from deployment.vector_store import build_collection, point_alias
uri, docs = sys.argv[1], json.loads(sys.argv[2])
cfg = DeployConfig(milvus_uri=uri)
for name in ("erp_kb_r0", "erp_kb_r1", "erp_kb_r2"):   # r0 never serves; r1 serves, then r2 replaces it
    build_collection(cfg, docs, name)
    if name != "erp_kb_r0":
        point_alias(uri, "erp_kb_shared", name)
print(json.dumps(_unload_idle(uri, "erp_kb", keep_loaded={"erp_kb_r1"})))   # r1 drains: it stays loaded
print("erp_kb_r2")
"""


@pytest.mark.integration
def test_milvus_lite_server_serves_several_processes(tmp_path):
    """With `erpops up --milvus`, one process keeps a client open while another builds collections behind an
    alias through the same URI (the embedded file would refuse the second process); the collection the alias left
    stays loaded for requests in flight (the drain), one that never served is unloaded."""
    from deployment.milvus import DEFAULT_EMBEDDER, alias_target, load_embedder, open_milvus, search

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")
    (tmp_path / "mlflow.yaml").write_text(f"tracking_uri: sqlite:///{tmp_path}/mlflow.db\n"
                                          f"artifact_location: {tmp_path / 'artifacts'}\n")
    home = tmp_path / "stack"
    up = subprocess.run([sys.executable, "-m", "erpops.cli", "up", "--home", str(home), "--no-worker", "--milvus",
                         "--milvus-port", "0", "--prefect-port", "0", "--mlflow-port", "0",
                         "--mlflow-config", str(tmp_path / "mlflow.yaml")], capture_output=True, text=True, cwd=tmp_path,
                        env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        uri = next(kv.split("=", 1)[1] for kv in up.stdout.split() if kv.startswith("ERPOPS_MILVUS_URI="))
        docs = [{"file": f"{m}_guide_en.md", "title": f"Guide to the {m} module", "module": m, "lang": "en",
                 "body": f"## Overview\nThe {m} module: how to use {m} screens, step by step."}
                for m in ("finance", "inventory", "hr")]
        with open_milvus(uri) as held:  # this process stays connected throughout
            assert alias_target(held, "erp_kb_shared") is None
            other = subprocess.run([sys.executable, "-c", KB_FROM_ANOTHER_PROCESS, uri, json.dumps(docs)], cwd=tmp_path,
                                   capture_output=True, text=True, env=env, timeout=300)
            assert other.returncode == 0, other.stderr[-3000:]
            *_, unloaded, collection = other.stdout.strip().splitlines()
            assert alias_target(held, "erp_kb_shared") == collection
            assert json.loads(unloaded) == ["erp_kb_r0"]
            states = {n: str(held.get_load_state(n)["state"]) for n in ("erp_kb_r0", "erp_kb_r1", "erp_kb_r2")}
            assert states == {"erp_kb_r0": "NotLoad", "erp_kb_r1": "Loaded", "erp_kb_r2": "Loaded"}, states
            hits = search(held, "erp_kb_shared", load_embedder(DEFAULT_EMBEDDER), "Guide to the inventory module")
            assert hits[0]["doc"] == "inventory_guide_en.md"
    finally:
        subprocess.run([sys.executable, "-m", "erpops.cli", "down", "--home", str(home)], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
