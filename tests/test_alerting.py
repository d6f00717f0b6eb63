"""Alerts back into training.

Unit: webhook verification (bearer, HMAC signature, forged, stale, replayed), which alerts ask for a retrain, the
retrain window. Integration, on real parts: Debian's Prometheus scrapes the chat service on loopback and evaluates
serving/alerts.yml (its windows shortened), an injected degradation (answers in the wrong language) fires
ErpopsWrongLanguage, Debian's Alertmanager delivers it to the service's webhook, and the service records one retrain
request; forged, replayed and flooding webhooks change nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

from serving.alerting import (RetrainWindow, SeenSignatures, WebhookRefused, payload_problems, retrain_reasons, sign,
                              verify)

SECRET = "alert-secret-for-tests"
PROMETHEUS, ALERTMANAGER = shutil.which("prometheus"), shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMTOOL = shutil.which("promtool")


def _alert(name="ErpopsWrongLanguage", status="firing", action="retrain"):
    labels = {"alertname": name, "env": "staging", "version": "2", **({"action": action} if action else {})}
    return {"status": status, "labels": labels, "annotations": {"summary": "40% of answers in the wrong language"}}


def test_a_webhook_proves_itself_with_the_bearer_secret_or_a_fresh_signature():
    body, now, seen = b'{"alerts": []}', 1_800_000_000, SeenSignatures()
    assert verify({"Authorization": f"Bearer {SECRET}"}, body, SECRET, now, seen) == "bearer"
    signed = {"X-Erpops-Timestamp": str(now - 10), "X-Erpops-Signature": sign(SECRET, now - 10, body)}
    assert verify(signed, body, SECRET, now, seen) == "signature"
    cases = [({"Authorization": "Bearer wrong"}, body, SECRET, 401, "without a valid"),
             ({}, body, SECRET, 401, "without a valid"),
             ({**signed, "X-Erpops-Signature": sign("other", now - 10, body)}, body, SECRET, 401, "does not match"),
             (signed, b'{"alerts": [1]}', SECRET, 401, "does not match"),  # the body was changed on the way
             (signed, body, SECRET, 409, "replayed"),
             ({"X-Erpops-Timestamp": str(now - 900), "X-Erpops-Signature": sign(SECRET, now - 900, body)}, body, SECRET,
              409, "from now"),
             ({"X-Erpops-Timestamp": "soon", "X-Erpops-Signature": "sha256=00"}, body, SECRET, 401, "Timestamp"),
             ({"Authorization": f"Bearer {SECRET}"}, body, None, 403, "no alert secret")]
    for headers, b, secret, status, says in cases:
        with pytest.raises(WebhookRefused, match=says) as e:
            verify(headers, b, secret, now, seen)
        assert e.value.status == status


def test_only_firing_alerts_labelled_retrain_ask_for_one():
    payload = {"alerts": [_alert(), _alert("ErpopsHighErrorRate", action=None), _alert(status="resolved")]}
    assert retrain_reasons(payload) == ["ErpopsWrongLanguage (env=staging version=2): 40% of answers in the wrong language"]
    assert retrain_reasons({"alerts": [_alert(action=None)]}) == [] and retrain_reasons({}) == []


def test_a_payload_of_another_shape_is_told_apart_with_every_problem_named():
    assert payload_problems({"version": "4", "alerts": [_alert(), _alert(status="resolved")]}) == []
    assert payload_problems({"alerts": []}) == [] and payload_problems({"alerts": [{}]}) == []
    assert payload_problems({"alerts": "firing"}) == ["alerts is a string, not a list"]
    assert payload_problems({"alerts": None}) == ["alerts is null, not a list"]
    assert payload_problems({}) == ["alerts is missing"] and payload_problems([1]) == ["the body is a list, not an object"]
    bad = {"alerts": [_alert(), {"labels": "x", "status": 1}, 7, {"labels": {"env": 2}, "annotations": {"summary": []}}]}
    assert payload_problems(bad) == ["alerts[1].status is a number, not a string",
                                     "alerts[1].labels is a string, not an object", "alerts[2] is a number, not an object",
                                     "alerts[3].labels.env is a number, not a string",
                                     "alerts[3].annotations.summary is a list, not a string"]


def test_the_retrain_window_allows_one_request_per_window(tmp_path):
    window = RetrainWindow(tmp_path / "serving.db")
    assert window.decide("a", 3600, now=1000.0) == (True, None)
    assert window.decide("b", 3600, now=2000.0) == (False, 1000.0)
    assert window.decide("c", 3600, now=4600.0) == (True, 1000.0)
    assert [o for _, o, _ in RetrainWindow(tmp_path / "serving.db").history()] == ["requested", "rate-limited", "requested"]


@pytest.mark.skipif(PROMTOOL is None, reason="Debian's prometheus (promtool) is not installed (make test installs it)")
def test_the_alert_rules_pass_promtool():
    out = subprocess.run([PROMTOOL, "check", "rules", str(REPO / "serving" / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


# ---- the whole loop on real parts --------------------------------------------------------------------------------

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not become ready: {log.read_text()[-2000:]}")


def fast_rules(text: str) -> str:
    """serving/alerts.yml with its windows and `for` durations cut to seconds (the expressions are unchanged)."""
    return re.sub(r"for: \d+[smh]", "for: 0s", re.sub(r"\[\d+[mh]\]", "[20s]", text))


@pytest.mark.integration
@pytest.mark.skipif(PROMETHEUS is None or ALERTMANAGER is None,
                    reason="Debian's prometheus and prometheus-alertmanager are not installed (make test installs them)")
def test_a_degradation_fires_an_alert_that_requests_one_retrain(tmp_path, monkeypatch):
    import httpx
    from service_world import live_server, served_world

    monkeypatch.setenv("ERPOPS_ALERT_SECRET", SECRET)
    procs = []
    with served_world(tmp_path / "world", cache=False, batch_wait_s=0, trace=False, canary_analysis=False) as w, \
            live_server(w.app) as url:
        try:
            am_port, prom_port = _port(), _port()
            (tmp_path / "alertmanager.yml").write_text(f"""
route: {{receiver: erpops, group_by: [alertname], group_wait: 1s, group_interval: 1s, repeat_interval: 1h}}
receivers:
  - name: erpops
    webhook_configs:
      - url: {url}/hooks/alertmanager
        send_resolved: false
        http_config: {{authorization: {{credentials: {SECRET}}}}}
""")
            (tmp_path / "rules.yml").write_text(fast_rules((REPO / "serving" / "alerts.yml").read_text()))
            (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{tmp_path / 'rules.yml'}]
alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{am_port}']}}]}}]}}
scrape_configs:
  - job_name: erpops
    static_configs: [{{targets: ['{url.removeprefix("http://")}']}}]
""")
            for name, cmd, ready in [
                ("alertmanager", [ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}",
                                  f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
                                  "--cluster.listen-address="], f"http://127.0.0.1:{am_port}/-/ready"),
                ("prometheus", [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'prom'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                 f"http://127.0.0.1:{prom_port}/-/ready")]:
                log = tmp_path / f"{name}.log"
                procs.append(subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT))
                _ready(ready, procs[-1], log)

            w.double.answer = "Sure, here is how that works in general."  # Korean questions, English answers
            window = w.service._retrain_window
            deadline = time.monotonic() + 120
            with httpx.Client(headers={"X-API-Key": w.keys["viewer"]}, timeout=30) as http:
                while not window.history() and time.monotonic() < deadline:
                    assert http.post(f"{url}/api/v1/chat", json={"message": "재고 이동은 어떻게 등록하나요?"}).status_code == 200
                    time.sleep(0.1)
            history = window.history()
            assert [o for _, o, _ in history] == ["requested"], (tmp_path / "alertmanager.log").read_text()[-2000:]
            assert "ErpopsWrongLanguage (env=staging version=2)" in history[0][2]
            def firing() -> set[str]:
                with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/alerts") as r:
                    return {a["labels"]["alertname"] for a in json.load(r)["data"]["alerts"] if a["state"] == "firing"}

            assert "ErpopsWrongLanguage" in firing() and "ErpopsHighErrorRate" not in firing()
            w.double.generate_error = "model crashed"  # now the answers fail: an alert that does not ask for a retrain
            deadline = time.monotonic() + 60
            with httpx.Client(headers={"X-API-Key": w.keys["viewer"]}, timeout=30) as http:
                while "ErpopsHighErrorRate" not in firing() and time.monotonic() < deadline:
                    http.post(f"{url}/api/v1/chat", json={"message": "재고 이동은 어떻게 등록하나요?"})
                    time.sleep(0.2)
            assert "ErpopsHighErrorRate" in firing()
            time.sleep(3)  # Alertmanager delivers it (group_wait 1s); the receiver records no retrain for it

            body = json.dumps({"version": "4", "alerts": [_alert()]}).encode()
            hook = f"{url}/hooks/alertmanager"
            forged = httpx.post(hook, content=body, headers={"Authorization": "Bearer guessed"})
            now = int(time.time())
            signed = {"X-Erpops-Timestamp": str(now), "X-Erpops-Signature": sign(SECRET, now, body)}
            flood = httpx.post(hook, content=body, headers=signed)
            replay = httpx.post(hook, content=body, headers=signed)
            assert forged.status_code == 401 and replay.status_code == 409
            assert flood.status_code == 202 and flood.json()["retrain"] == "rate-limited"
            assert [o for _, o, _ in window.history()] == ["requested", "rate-limited"]
            metrics = httpx.get(f"{url}/metrics").text
            assert 'erpops_retrain_requests_total{outcome="requested"} 1.0' in metrics
            assert 'erpops_alerts_received_total{alertname="ErpopsHighErrorRate",status="firing"}' in metrics
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)
