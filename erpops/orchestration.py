"""Operations on Prefect itself: the local stack (`erpops up` / `down`), deployment runs for CI (`erpops trigger`),
and the run summary published as a Prefect artifact.

    erpops up                      # Prefect server + MLflow server on 127.0.0.1 + a process worker; prints URLs
    prefect deploy --all           # the deployments of prefect.yaml (nightly, on-merge, release)
    erpops trigger --deployment train-and-gate/on-merge --watch --timeout 1800
    erpops down

Nothing here schedules or queues work: schedules, triggers and the work pool are Prefect's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WORK_POOL = "erpops-process"
"""The process work pool the deployments of prefect.yaml run on."""
SUMMARY_ARTIFACT = "erpops-run-summary"
"""Key of the Prefect artifact holding a run's summary (the Prefect UI shows it; `erpops trigger` reads it)."""
FINAL_OK = "COMPLETED"


class OrchestrationError(RuntimeError):
    """The server, the deployment or the worker is not there; the message says which and what to do."""


# -- the local stack ---------------------------------------------------------------------------------------

@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str
    started: int | None = None
    """The process's start time (`process_start`) when it was spawned: after it exits its pid can be given to
    another process, which `erpops down` must not stop. None: not known (no /proc); the pid is trusted."""

    def running(self) -> bool:
        """Whether this service's process is still the one running under its pid."""
        return _alive(self.pid) and not self.reused()

    def reused(self) -> bool:
        """Whether its pid now belongs to another process. (While any process of the service's group lives, the
        kernel gives its pid to no other process: a group whose first process exited is still the service's.)"""
        return self.started is not None and _alive(self.pid) and process_start(self.pid) != self.started


@dataclass
class Stack:
    services: list[Service] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """What a shell needs to use the stack (PREFECT_API_URL, MLFLOW_TRACKING_URI)."""

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> "Stack":
        data = json.loads(path.read_text())
        return cls([Service(**s) for s in data["services"]], data.get("env", {}))


def free_port(preferred: int) -> int:
    """`preferred` when it is free on 127.0.0.1, else (or for 0) one the kernel picks."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise OrchestrationError(f"{url}: the process exited with {proc.returncode} before answering\n{tail}")
        if time.time() > deadline:
            raise OrchestrationError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path) -> tuple[subprocess.Popen, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def start_stack(home: Path, tracking_uri: str, artifact_root: str, project_dir: Path, prefect_port: int = 4200,
                mlflow_port: int = 5000, prefect_database_url: str | None = None, worker: bool = True,
                timeout: float = 120.0, clients_use_server: bool = False, milvus_port: int | None = None) -> Stack:
    """Start a Prefect server, an MLflow server and (optionally) a process worker, each in its own process
    group, and wait until they answer. Prefect keeps its state under `home` (SQLite) unless
    `prefect_database_url` names a database (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/prefect).
    `tracking_uri` is the MLflow server's backend store; with `clients_use_server` the flows (the worker's and
    what the printed exports set) track through the server's URL instead of opening the store themselves.
    `milvus_port`: also a Milvus Lite server (data under `home`/milvus) that several processes can share."""
    stack_file = home / "stack.json"
    if stack_file.exists() and any(s.running() for s in Stack.read(stack_file).services):
        raise OrchestrationError(f"a stack is already running (see {stack_file}); `erpops down` stops it")
    prefect_port, mlflow_port = free_port(prefect_port), free_port(mlflow_port)
    api = f"http://127.0.0.1:{prefect_port}/api"
    client_uri = f"http://127.0.0.1:{mlflow_port}" if clients_use_server else tracking_uri
    env = {**os.environ, "PREFECT_HOME": str((home / "prefect").resolve()), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "ERPOPS_PROJECT_DIR": str(project_dir.resolve()),
           "MLFLOW_TRACKING_URI": client_uri, "MLFLOW_REGISTRY_URI": client_uri}
    if prefect_database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database_url
    logs = home / "logs"
    stack = Stack(env={"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": client_uri,
                       "ERPOPS_PROJECT_DIR": env["ERPOPS_PROJECT_DIR"], "PREFECT_HOME": env["PREFECT_HOME"]})
    started: list[subprocess.Popen] = []

    def record(service: Service) -> None:  # on disk at once: an `up` killed while it waits leaves what `down` stops
        stack.services.append(service)
        stack.write(stack_file)
    try:
        p, log = _spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                           "--port", str(prefect_port)], env, logs, project_dir)
        started.append(p)
        record(Service("prefect-server", p.pid, f"http://127.0.0.1:{prefect_port}", str(log), process_start(p.pid)))
        m, mlog = _spawn("mlflow-server", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                                           "--default-artifact-root", artifact_root, "--host", "127.0.0.1",
                                           "--port", str(mlflow_port), "--workers", "1"], env, logs, project_dir)
        started.append(m)
        record(Service("mlflow-server", m.pid, f"http://127.0.0.1:{mlflow_port}", str(mlog), process_start(m.pid)))
        if milvus_port is not None:
            milvus_port = free_port(milvus_port)
            mv, mvlog = _spawn("milvus-server", [str(Path(sys.executable).with_name("milvus-lite")), "server", "--data-dir",
                                                 str((home / "milvus").resolve()), "--host", "127.0.0.1",
                                                 "--port", str(milvus_port)], env, logs, project_dir)
            started.append(mv)
            uri = f"http://127.0.0.1:{milvus_port}"
            stack.env["ERPOPS_MILVUS_URI"] = uri
            record(Service("milvus-server", mv.pid, uri, str(mvlog), process_start(mv.pid)))
            wait_tcp("127.0.0.1", milvus_port, timeout, mv, mvlog)
        wait_http(f"{api}/health", timeout, p, log)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", timeout, m, mlog)
        if worker:
            from erpops.runtime import jemalloc_env

            # its flow runs train and score models: under jemalloc where the system has it, as `erpops run` is
            worker_env = jemalloc_env(["erpops", "run"], env) or env
            w, wlog = _spawn("prefect-worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL,
                                                "--type", "process"], worker_env, logs, project_dir)
            started.append(w)
            record(Service("prefect-worker", w.pid, WORK_POOL, str(wlog), process_start(w.pid)))
            wait_pool(api, WORK_POOL, timeout, w, wlog)
    except BaseException:
        for proc in started:
            _stop(proc.pid)
        stack_file.unlink(missing_ok=True)
        raise
    return stack


def wait_tcp(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex((host, port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise OrchestrationError(f"{host}:{port}: the process exited with {proc.returncode} before listening\n{tail}")
        if time.time() > deadline:
            raise OrchestrationError(f"nothing listened on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.5)


def wait_pool(api: str, pool: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until the work pool exists and a worker polls it."""
    deadline = time.time() + timeout
    while True:
        try:
            req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if json.loads(r.read()):
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise OrchestrationError(f"the worker for pool {pool} exited with {proc.returncode}\n{tail}")
        if time.time() > deadline:
            raise OrchestrationError(f"no worker polled pool {pool} within {timeout:.0f} s")
        time.sleep(0.5)


def stop_stack(home: Path, timeout: float = 30.0) -> list[str]:
    """Stop every process of the stack that is still running (SIGTERM to its group, SIGKILL after `timeout`);
    returns the names of those it stopped. A pid now held by another process (the service exited and the pid was
    given out again) is left alone."""
    stack_file = home / "stack.json"
    if not stack_file.exists():
        return []
    stack = Stack.read(stack_file)
    stopped = []
    for s in reversed(stack.services):  # the worker first, so it does not pick up work while the server goes
        if not s.reused() and _stop(s.pid, timeout):
            stopped.append(s.name)
    stack_file.unlink()
    return stopped[::-1]


def _stat_fields(path: Path) -> list[str] | None:
    """The fields of a /proc/<pid>/stat after "pid (comm) " (field 3, the state, is index 0); None when it cannot
    be read (no /proc, or the process is gone)."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks after boot: field 22 of /proc/<pid>/stat), which tells a process from
    a later one given the same pid; None where there is no /proc or no such process."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[19]) if fields else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. From /proc where there is one, so that a zombie (exited, not
    yet reaped by whatever adopted it; a container's pid 1 may never) does not count; else by signal 0."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            fields = _stat_fields(stat)  # state, ppid, pgrp, ...
            if fields and int(fields[2]) == pgid and fields[0] not in "ZX":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM to the process group `pid` leads, SIGKILL after `timeout`; False when no such group was there. Done
    when the whole group is gone, not only its leader: `mlflow server`'s uvicorn and a process worker's flow runs
    are children in the group, and one slow to stop (or deaf to SIGTERM) gets the SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(ChildProcessError):  # our child: reaped, so that no zombie keeps the group
            os.waitpid(pid, os.WNOHANG)
        if not _group_alive(pid):
            return True
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    return True


# -- triggering deployments --------------------------------------------------------------------------------

def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs; a value that parses as JSON is taken as such (numbers, true, null), else as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _json_types(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    return {float: {"number"}, str: {"string"}, list: {"array"}, dict: {"object"}}.get(type(value), set())


def _accepted_types(schema: dict) -> set[str]:
    types = schema.get("type")
    out = set(types) if isinstance(types, list) else {types} if types else set()
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            out |= _accepted_types(option)
    return out


def fit_params(parameters: dict[str, Any], schema: dict | None) -> dict[str, Any]:
    """`parse_params`' values as the deployment's parameter schema takes them: a value read as JSON (`3`, `true`)
    for a parameter that takes a string but not that type goes back to its text (`version=3` is the string "3" for
    `version: str | None`). Pure."""
    props = (schema or {}).get("properties") or {}
    out = dict(parameters)
    for key, value in parameters.items():
        accepted = _accepted_types(props.get(key) or {})
        if accepted and "string" in accepted and not (_json_types(value) & accepted) and not isinstance(value, str):
            out[key] = json.dumps(value, ensure_ascii=False)
    return out


def exit_code(state_type: str | None) -> int:
    """0 only for a run that completed; 1 for failed, crashed, cancelled or still-unfinished runs. Pure."""
    return 0 if state_type == FINAL_OK else 1


@dataclass
class TriggerResult:
    deployment: str
    flow_run_id: str
    state: str
    """Final state type (COMPLETED, FAILED, ...), or where it stood when the timeout hit."""
    message: str
    summary: dict | None
    """The run summary the flow published (SUMMARY_ARTIFACT), when there is one."""

    @property
    def code(self) -> int:
        return exit_code(self.state)


def trigger(deployment: str, parameters: dict[str, Any], watch: bool, timeout: float, poll_s: float = 2.0) -> TriggerResult:
    """Create a run of `deployment` ("flow-name/deployment-name"); with `watch`, wait for its final state.

    Raises OrchestrationError for a server that does not answer or an unknown deployment. A run still not
    final after `timeout` seconds is cancelled (a late start would surprise whoever reads the exit code), and
    the message says whether a worker ever picked it up."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise OrchestrationError("PREFECT_API_URL is not set: start the stack with `erpops up` and export what it prints")
    try:
        wait_http(f"{api}/health", min(timeout, 10))
    except OrchestrationError:
        raise OrchestrationError(f"no Prefect server answers at {api}: start it with `erpops up`") from None
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            flows = {f.id: f.name for f in client.read_flows()}
            known = sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())
            raise OrchestrationError(f"unknown deployment {deployment!r} (flow-name/deployment-name); "
                                     f"deployments on {api}: {known or 'none (run `prefect deploy --all`)'}") from None
        try:
            run = client.create_flow_run_from_deployment(dep.id, parameters=fit_params(parameters,
                                                                                       dep.parameter_openapi_schema),
                                                         tags=["erpops-trigger"])
        except PrefectHTTPStatusError as e:  # parameters the deployment refuses (its schema), and the like
            raise OrchestrationError(f"{deployment}: the server refused the run (HTTP {e.response.status_code}): "
                                     f"{e.response.text[:1000]}") from None
        if not watch:
            return TriggerResult(deployment, str(run.id), run.state.type.value if run.state else "SCHEDULED",
                                 "created", None)
        deadline, started = time.time() + timeout, False
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            started = started or (state is not None and state.type.value not in ("SCHEDULED", "PENDING"))
            if state is not None and state.is_final():
                return TriggerResult(deployment, str(run.id), state.type.value, state.message or state.name,
                                     _summary(client, run.id))
            if time.time() > deadline:
                if cancel_run(client, run.id, f"erpops trigger: not finished within {timeout:.0f} s") not in \
                        ("CANCELLING", "CANCELLED"):
                    continue  # it ended just now: the next look reports how
                why = ("still running" if started else
                       f"never started: no worker picked it up from pool {dep.work_pool_name!r} (`prefect worker start "
                       f"--pool {dep.work_pool_name}`)")
                return TriggerResult(deployment, str(run.id), state.type.value if state else "SCHEDULED",
                                     f"timed out after {timeout:.0f} s ({why}); the run was cancelled", None)
            time.sleep(poll_s)


def cancel_run(client, flow_run_id, message: str) -> str:
    """Cancel a flow run the way `prefect flow-run cancel` does, and return the state type it is left in.

    The run goes to Cancelling, not straight to Cancelled: a worker running it sees Cancelling, stops its process
    and marks it Cancelled (a run forced to Cancelled would be left running, unseen); the server turns Cancelling
    into Cancelled itself for a run no worker picked up (nothing to stop). A run that reached a final state in the
    meantime (it finished between the caller's last look and this call) is left as it ended, and that state is
    returned. Where the server refuses Cancelling otherwise, the run is forced to Cancelled so that no late start
    surprises anyone."""
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled, Cancelling

    result = client.set_flow_run_state(flow_run_id, Cancelling(message=message))
    if result.status in (SetStateStatus.ACCEPT, SetStateStatus.REJECT) and result.state is not None and \
            result.state.type.value in ("CANCELLING", "CANCELLED"):
        return result.state.type.value
    now = client.read_flow_run(flow_run_id).state
    if now is not None and now.is_final():
        return now.type.value
    client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
    return "CANCELLED"


def _summary(client, flow_run_id) -> dict | None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT])))
    if not found:
        return None
    return summary_from_markdown(sorted(found, key=lambda a: a.created)[-1].data or "")


def summary_markdown(summary: dict) -> str:
    """The run summary as the Prefect UI shows it: a stage table, the verdict, then the JSON itself."""
    lines = ["| stage | status | time s | peak RSS MiB | detail |", "|---|---|---|---|---|"]
    for s in summary.get("stages", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['duration_s']} | {s.get('peak_rss_mb') or '-'} | "
                     f"{(s.get('reason') or '').replace('|', '/')} |")
    out = summary.get("outputs", {})
    head = [f"**model version** {out.get('model_version', '-')}  ",
            f"**gate verdict** {gate_verdict(summary) or '-'}  ",
            f"**no change** {out.get('no_change', False)}"]
    return "\n".join(head + [""] + lines + ["", "```json", json.dumps(summary, ensure_ascii=False, default=str), "```"])


def summary_from_markdown(markdown: str) -> dict | None:
    start = markdown.find("```json\n")
    end = markdown.rfind("\n```")
    if start < 0 or end <= start:
        return None
    try:
        return json.loads(markdown[start + len("```json\n"):end])
    except json.JSONDecodeError:
        return None


def gate_verdict(summary: dict) -> str | None:
    for s in summary.get("stages", []):
        if s["name"] == "evaluate":
            return (s.get("outputs") or {}).get("verdict") or (s["status"] if s["status"] != "ok" else None)
    return None


def publish_summary(summary: dict) -> None:
    """The summary as a Prefect artifact of the current flow run (a no-op outside one)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_ARTIFACT, description="erpops run summary")


# -- events ----------------------------------------------------------------------------------------------------

PROMOTED_EVENT = "erpops.model.promoted"
"""Emitted when a version becomes champion (by the gate or by hand); prefect.yaml's release-staging deployment
is triggered by it and releases that version to staging."""


def promotion_event(model: str, version: str, previous: str | None, recipe_path: str, mlflow_config: str | None,
                    actor: str, reason: str) -> dict:
    """The event's resource and payload (pure): what the trigger's parameters are templated from."""
    return {"event": PROMOTED_EVENT,
            "resource": {"prefect.resource.id": f"erpops.model.{model}", "prefect.resource.name": model},
            "payload": {"model": model, "version": str(version), "previous": previous, "recipe_path": str(recipe_path),
                        "mlflow_config": str(Path(mlflow_config).resolve()) if mlflow_config else "",
                        "actor": actor, "reason": reason}}


def emit_promotion(model: str, version: str, previous: str | None, recipe_path: str, mlflow_config: str | None,
                   actor: str, reason: str) -> bool:
    """Emit the promotion event to the Prefect API this process talks to, and wait until it is sent. Outside a
    flow run with no PREFECT_API_URL there is no server to tell: nothing is emitted (False)."""
    return emit(promotion_event(model, version, previous, recipe_path, mlflow_config, actor, reason))


RETRAIN_EVENT = "erpops.retrain.requested"
"""Emitted by the chat service's alert receiver when an alert labelled action=retrain fires (at most once per its
window); prefect.yaml's on-alert deployment is triggered by it and retrains with the reason as a parameter."""


def retrain_event(env: str, reason: str, alerts: list[str], recipe_path: str, mlflow_config: str | None) -> dict:
    """The retrain request's resource and payload (pure)."""
    return {"event": RETRAIN_EVENT,
            "resource": {"prefect.resource.id": f"erpops.serving.{env}", "prefect.resource.name": f"erpops serving {env}"},
            "payload": {"reason": reason, "alerts": alerts, "env": env, "recipe_path": str(recipe_path),
                        "mlflow_config": str(Path(mlflow_config).resolve()) if mlflow_config else ""}}


def emit(event: dict) -> bool:
    """Send one event to the Prefect API this process talks to and wait until it is sent; False (nothing sent)
    outside a flow run with no PREFECT_API_URL: there is no server to tell."""
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if FlowRunContext.get() is None and not PREFECT_API_URL.value():
        return False
    sent = emit_event(**event)
    if FlowRunContext.get() is None:
        EventsWorker.drain_all()
    return sent is not None
