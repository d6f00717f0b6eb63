"""Orchestration on real parts: `erpops up` (Prefect server, MLflow server, process worker), `prefect deploy --all`
from prefect.yaml, and `erpops trigger --watch` exit codes for a passing run, a failing run (bad data), an unknown
deployment, a pool no worker polls, and a server that is down. Plus the pure parts (parameters, exit codes,
the summary artifact's round trip, prefect.yaml's shape)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_corpus
from erpops.orchestration import exit_code, parse_params, summary_from_markdown, summary_markdown


def test_parse_params_reads_json_values_and_refuses_a_missing_equals():
    assert parse_params(["a=1", "b=true", "c=text", "d=null", "e={\"x\": 2}", "f=a=b"]) == {
        "a": 1, "b": True, "c": "text", "d": None, "e": {"x": 2}, "f": "a=b"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["novalue"])


def test_parameters_read_as_json_are_fitted_to_the_deployment_s_schema():
    """`-p version=3` for the release flow's `version: str | None`: the string "3", which the server's parameter
    validation takes (the integer 3 it answers with 409)."""
    from erpops.orchestration import fit_params

    schema = {"properties": {"version": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                             "steps": {"type": "integer"}, "any": {}, "run_name": {"type": "string"},
                             "ratio": {"anyOf": [{"type": "number"}, {"type": "string"}]}}}
    given = parse_params(["version=3", "steps=5", "any=7", "run_name=20250101", "ratio=0.5", "extra=1"])
    assert fit_params(given, schema) == {"version": "3", "steps": 5, "any": 7, "run_name": "20250101", "ratio": 0.5,
                                         "extra": 1}
    assert fit_params(parse_params(["version=null"]), schema) == {"version": None}
    assert fit_params(given, None) == given


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_down_stops_the_stack_s_processes_and_never_a_process_that_took_a_dead_one_s_pid(tmp_path):
    """`erpops down` stops by pid; a service that exited may have its pid given to another process, which must
    be left alone: each service carries its process's start time, and a pid whose process started at another
    time is not the service's."""
    from erpops.orchestration import Service, Stack, process_start, stop_stack

    exited = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone = Service("milvus-server", exited.pid, "http://127.0.0.1:3", "log", process_start(exited.pid))
    exited.wait(timeout=30)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        alive = Service("mlflow-server", child.pid, "http://127.0.0.1:1", "log", process_start(child.pid))
        # this test's own process stands for one that took the pid of a service which exited
        reused = Service("prefect-server", os.getpid(), "http://127.0.0.1:2", "log", process_start(os.getpid()) + 1)
        assert alive.running() and not reused.running() and reused.reused() and not gone.running()
        Stack([reused, alive, gone]).write(tmp_path / "stack.json")
        assert stop_stack(tmp_path, timeout=10) == ["mlflow-server"]
        assert child.wait(timeout=10) is not None and not (tmp_path / "stack.json").exists()
        assert not alive.running()  # and this process is still here to check it
    finally:
        if child.poll() is None:
            child.kill()


GROUP = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process states come from /proc")
def test_stopping_a_service_waits_for_its_whole_process_group(tmp_path):
    """The leader (as `mlflow server`) exits on SIGTERM at once; its child (uvicorn, a worker's flow run) ignores
    it. The service is stopped when the group is gone: the child gets the SIGKILL, not an orphan's life."""
    from erpops.orchestration import _stop

    def running(pid: int) -> bool:  # a zombie waiting for whatever adopted it counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    leader = subprocess.Popen([sys.executable, "-c", GROUP], start_new_session=True, stdout=subprocess.PIPE, text=True)
    child = int(leader.stdout.readline())
    try:
        time.sleep(0.5)  # the child has set its handler
        assert _stop(leader.pid, timeout=3) is True
        deadline = time.time() + 10
        while running(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(child) and leader.poll() is not None
    finally:
        for pid in (child, leader.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_exit_code_is_0_only_for_completed():
    assert exit_code("COMPLETED") == 0
    assert {exit_code(s) for s in ("FAILED", "CRASHED", "CANCELLED", "RUNNING", "SCHEDULED", None)} == {1}


def test_summary_artifact_round_trips():
    summary = {"stages": [{"name": "evaluate", "status": "ok", "duration_s": 1.0, "reason": None,
                           "outputs": {"verdict": "hold"}}], "outputs": {"model_version": "3", "no_change": False}}
    md = summary_markdown(summary)
    assert "| evaluate | ok |" in md and "**gate verdict** hold" in md
    assert summary_from_markdown(md) == summary
    assert summary_from_markdown("no json here") is None


def test_prefect_yaml_deployments_run_on_the_process_pool_with_a_seoul_nightly():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) >= {"nightly-retrain", "on-merge", "train-and-gate", "release-dev", "release-staging", "train-gpu"}
    assert {n: d["work_pool"]["name"] for n, d in deps.items() if d["work_pool"]["name"] != "erpops-process"} == {
        "train-gpu": "erpops-gpu"}  # only the train stage runs on the second (GPU) pool
    nightly = deps["nightly-retrain"]["schedules"][0]
    assert nightly["timezone"] == "Asia/Seoul" and len(nightly["cron"].split()) == 5
    trigger = deps["release-staging"]["triggers"][0]  # a promotion releases to staging; nothing else is automatic
    assert trigger["expect"] == ["erpops.model.promoted"] and trigger["parameters"]["env"] == "staging"
    assert sorted(n for n, d in deps.items() if d.get("triggers")) == ["on-alert", "release-staging"]
    from erpops.orchestration import retrain_event

    alert = deps["on-alert"]  # an alert's retrain request: train-and-gate, never two at once
    assert alert["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert alert["triggers"][0]["expect"] == [retrain_event("staging", "r", [], "r.yaml", None)["event"]]
    import re

    asked = {m for v in alert["triggers"][0]["parameters"].values() for m in re.findall(r"event\.payload\.(\w+)", str(v))}
    assert asked == {"reason", "recipe_path", "mlflow_config"} <= set(retrain_event("staging", "r", [], "r.yaml", None)["payload"])
    from erpops.orchestration import promotion_event

    event = promotion_event("erp-assistant", "3", "2", "r.yaml", None, "ci", "gate")
    assert event["event"] == "erpops.model.promoted" and event["resource"]["prefect.resource.id"] == "erpops.model.erp-assistant"
    used = {m for v in trigger["parameters"].values() for m in re.findall(r"event\.payload\.(\w+)", str(v))}
    assert used and used <= set(event["payload"])
    for d in deps.values():  # every entrypoint names a real flow
        path, func = d["entrypoint"].split(":")
        assert f"def {func}(" in (REPO / path).read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _erpops(*args, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "erpops.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


@pytest.mark.integration
@pytest.mark.slow
def test_up_deploy_trigger_exit_codes_then_down(tmp_path):
    corpus = make_corpus(tmp_path / "erp")
    recipe = (REPO / "recipes" / "tiny" / "test.yaml").read_text()
    recipe = (recipe.replace("root: data/erp", f"root: {corpus}")
              .replace("output_root: .erpops/runs", f"output_root: {tmp_path / 'runs'}")
              .replace("milvus_uri: .erpops/milvus.db", f"milvus_uri: {tmp_path / 'milvus.db'}"))
    (tmp_path / "tiny.yaml").write_text(recipe)
    (tmp_path / "mlflow.yaml").write_text(f"tracking_uri: sqlite:///{tmp_path}/mlflow.db\n"
                                          f"artifact_location: {tmp_path / 'artifacts'}\n")
    home = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               OLLAMA_HOST="http://127.0.0.1:9")
    up = _erpops("up", "--home", str(home), "--mlflow-config", str(tmp_path / "mlflow.yaml"),
                 "--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port()), env=env, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        exports = next(line for line in up.stdout.splitlines() if line.startswith("export "))
        env.update(dict(kv.split("=", 1) for kv in exports[len("export "):].split()))
        assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"} <= set(env)
        mlflow_url = next(line.split()[1] for line in up.stdout.splitlines() if line.startswith("mlflow-server"))
        import urllib.request

        with urllib.request.urlopen(f"{mlflow_url}/health") as r:  # the MLflow server answers
            assert r.status == 200

        from erpops.orchestration import wait_pool

        gpu_log = open(tmp_path / "gpu-worker.log", "wb")  # a second pool, as a GPU machine's worker would poll it
        gpu_worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "erpops-gpu",
                                       "--type", "process"], cwd=REPO, env=env, stdout=gpu_log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        wait_pool(env["PREFECT_API_URL"], "erpops-gpu", 120, gpu_worker)
        deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

        params = ["-p", f"recipe_path={tmp_path / 'tiny.yaml'}", "-p", f"mlflow_config={tmp_path / 'mlflow.yaml'}"]
        summary_md = tmp_path / "summary.md"
        ok = _erpops("trigger", "-d", "train-and-gate/on-merge", *params, "--watch", "--timeout", "600",
                     "--summary-file", str(summary_md), env=env)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        result = json.loads(ok.stdout)
        assert result["state"] == "COMPLETED" and result["gate_verdict"] == "promote" and result["model_version"] == "1"
        assert "| promote | ok |" in summary_md.read_text()

        # the promotion emitted erpops.model.promoted; release-staging's trigger released v1 to staging, no call made
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deadline, released = time.time() + 300, None
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            while time.time() < deadline:
                runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["release"])))
                if runs and runs[0].state and runs[0].state.is_final():
                    released = runs[0]
                    break
                time.sleep(2)
            assert released is not None, "no release flow run was triggered by the promotion"
            assert released.state.type.value == "COMPLETED", released.state.message
            assert str(released.parameters["version"]) == "1" and released.parameters["env"] == "staging"
            assert client.read_deployment(released.deployment_id).name == "release-staging"
        from deployment.releases import ReleaseLedger
        from erpops.config import MLflowSettings

        # not load_mlflow_settings: this process's MLFLOW_TRACKING_URI (set by earlier tests) would override the file
        ledger = ReleaseLedger(MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
        current, _ = ledger.serving("staging")
        assert current and ledger.release(current).model_version == "1"

        # an alert asks for a retrain (the chat service's receiver emits erpops.retrain.requested): on-alert's
        # trigger starts train-and-gate with the alert as its reason; a second request while it runs is cancelled.
        # The first retrain (a changed recipe: it trains, and its gate rejects) is held at its registration by the
        # registry lock this test takes, so it is surely running when the second request comes.
        from erpops.orchestration import emit, retrain_event
        from registry.promote import registry_lock

        alert_recipe = tmp_path / "tiny-alert.yaml"
        alert_recipe.write_text(recipe.replace("max_steps: 8", "max_steps: 9").replace("min_rouge_l: 0.0", "min_rouge_l: 1.0"))
        reason = "alert: ErpopsWrongLanguage (env=staging version=1): 40% of answers in the wrong language"

        def alert_runs(client) -> list:
            on_alert = client.read_deployment_by_name("train-and-gate/on-alert").id
            return sorted((r for r in client.read_flow_runs() if r.deployment_id == on_alert), key=lambda r: r.created)

        def wait_runs(client, done, what: str) -> list:
            deadline = time.time() + 300
            while time.time() < deadline:
                runs = alert_runs(client)
                if done(runs):
                    return runs
                time.sleep(1)
            raise AssertionError(f"{what}: {[(r.name, r.state and r.state.type.value, r.state and r.state.message) for r in alert_runs(client)]}")

        def request() -> None:
            assert emit(retrain_event("staging", reason, [reason], str(alert_recipe), str(tmp_path / "mlflow.yaml")))

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            with registry_lock(MLflowSettings(tracking_uri=env["MLFLOW_TRACKING_URI"])):
                request()
                wait_runs(client, lambda rs: len(rs) == 1 and rs[0].state.type.value == "RUNNING", "no retrain running")
                request()
                runs = wait_runs(client, lambda rs: len(rs) == 2 and rs[1].state.is_final(), "the second request stayed")
                assert runs[1].state.type.value == "CANCELLED", runs[1].state
                assert runs[0].state.type.value == "RUNNING"
            runs = wait_runs(client, lambda rs: rs[0].state.is_final(), "the first retrain did not finish")
            assert [r.state.type.value for r in runs] == ["COMPLETED", "CANCELLED"], [r.state for r in runs]
            assert {r.parameters["reason"] for r in runs} == {reason}

        # the train stage on the second pool: train-and-gate calls the train-gpu deployment and gets the adapter
        # back through the MLflow run; a changed recipe section (train.deployment) means a new training
        remote_recipe = tmp_path / "tiny-remote.yaml"
        remote_recipe.write_text(recipe.replace("  precision: fp32", "  precision: fp32\n  deployment: train-remote/train-gpu"))
        remote = _erpops("trigger", "-d", "train-and-gate/train-and-gate", "-p", f"recipe_path={remote_recipe}",
                         "-p", f"mlflow_config={tmp_path / 'mlflow.yaml'}", "--watch", "--timeout", "600", env=env)
        assert remote.returncode == 0, remote.stdout + remote.stderr
        remote_summary = json.loads(remote.stdout)
        # same data, seed and device as the first run: the remote adapter gives the champion's GGUF ("no change")
        # or, where kernels differ, a candidate the gate judges
        assert remote_summary["no_change"] or remote_summary["gate_verdict"] in ("promote", "hold", "reject")
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-remote"])))
            assert [r.state.type.value for r in runs] == ["COMPLETED"]
            assert runs[0].work_pool_name == "erpops-gpu"
        import mlflow

        client_ml = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        run_id = runs[0].parameters["mlflow_run_id"]
        assert {"adapter", "train", "data"} <= {a.path for a in client_ml.list_artifacts(run_id)}
        assert "train/loss" in client_ml.get_run(run_id).data.metrics

        with open(corpus / "qa_pairs.jsonl", "a", encoding="utf-8") as f:  # bad data: the run fails at validate
            f.write('{"id": "qa-bad", "module": "hr", "lang": "en", "instruction": "Hi", "response": "<|im_end|>"}\n')
        bad = _erpops("trigger", "-d", "train-and-gate/on-merge", *params, "--watch", "--timeout", "600", env=env)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        failed = json.loads(bad.stdout)
        assert failed["state"] == "FAILED" and "validate" in failed["message"] and failed["model_version"] is None

        unknown = _erpops("trigger", "-d", "erpops-pipeline/nope", "--watch", "--timeout", "30", env=env)
        assert unknown.returncode == 2 and "unknown deployment" in unknown.stderr
        assert "train-and-gate/on-merge" in unknown.stderr and "Traceback" not in unknown.stderr

        stack = json.loads((home / "stack.json").read_text())
        worker = next(s for s in stack["services"] if s["name"] == "prefect-worker")
        os.killpg(worker["pid"], 15)  # nobody polls the pool now: the run must time out, be cancelled, exit 1
        orphan = _erpops("trigger", "-d", "train-and-gate/train-and-gate", *params, "--watch", "--timeout", "20", env=env)
        assert orphan.returncode == 1, orphan.stdout + orphan.stderr
        late = json.loads(orphan.stdout)
        assert "no worker picked it up" in late["message"] and "erpops-process" in late["message"]
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            assert client.read_flow_run(late["flow_run_id"]).state.type.value == "CANCELLED"
    finally:
        if "gpu_worker" in locals():
            os.killpg(gpu_worker.pid, 15)
            gpu_worker.wait(timeout=60)
        down = _erpops("down", "--home", str(home), env=env)
    assert down.returncode == 0 and "prefect-server" in down.stdout
    gone = _erpops("trigger", "-d", "train-and-gate/on-merge", "--watch", "--timeout", "5", env=env)
    assert gone.returncode == 2 and "no Prefect server answers" in gone.stderr


def test_each_stage_records_its_own_peak_rss():
    """In a fresh process: this worker's earlier tests left children whose peaks getrusage reports when they are
    reaped, which may happen during any stage here."""
    code = """
import json
from pathlib import Path
from erpops.summary import RunSummary, peak_rss_mb
summary = RunSummary(Path("/tmp/erpops-peak-test"), "r.yaml")
with summary.stage("validate"):
    big = bytearray(300 * 1024 * 1024)  # touched: 300 MiB resident
    big[::4096] = b"x" * len(big[::4096])
    del big
with summary.stage("train"):
    pass
print(json.dumps({"supported": peak_rss_mb() is not None, "validate": summary.stages["validate"].peak_rss_mb,
                  "train": summary.stages["train"].peak_rss_mb, "metrics": summary.memory_metrics(),
                  "table": summary.table()}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if not got["supported"]:
        pytest.skip("no /proc/self/status here")
    validate, train = got["validate"], got["train"]
    assert validate - train > 250, (validate, train)  # the counter was reset: train does not inherit validate's peak
    metrics = got["metrics"]
    assert metrics["system/peak_rss_megabytes"] == metrics["system/peak_rss_megabytes_validate"] == validate
    assert "peak RSS" in got["table"] and "GiB" in got["table"]


@pytest.mark.integration
def test_cancel_run_leaves_a_running_run_to_its_worker_and_cancels_one_never_picked_up(prefect_harness):
    """A run that times out goes to Cancelling, which the worker running it acts on (stops the process, marks it
    Cancelled); forced straight to Cancelled it would keep running unseen. One no worker picked up has nothing to
    stop: the server makes it Cancelled at once."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running, Scheduled

    from erpops.orchestration import cancel_run

    @flow(name="erpops-cancel-probe")
    def probe():
        return 1

    with get_client(sync_client=True) as client:
        waiting = client.create_flow_run(probe, state=Scheduled())  # as a deployment's run waits for a worker
        assert cancel_run(client, waiting.id, "timed out") == "CANCELLED"
        assert client.read_flow_run(waiting.id).state.type.value == "CANCELLED"

        running = client.create_flow_run(probe)
        client.set_flow_run_state(running.id, Running(), force=True)
        assert cancel_run(client, running.id, "timed out") == "CANCELLING"
        state = client.read_flow_run(running.id).state
        assert state.type.value == "CANCELLING" and state.message == "timed out"

        done = client.create_flow_run(probe)  # it finished between the caller's last look and the cancel
        client.set_flow_run_state(done.id, Running(), force=True)
        client.set_flow_run_state(done.id, Completed(), force=True)
        assert cancel_run(client, done.id, "timed out") == "COMPLETED"
        assert client.read_flow_run(done.id).state.type.value == "COMPLETED"
