"""deployment/ollama_deploy.py against an in-process Ollama test double (tests/ollama_double.py).

The unit tier needs no Ollama: the double speaks the REST API the official `ollama` client uses. One test,
marked `ollama_server`, talks to a real server at OLLAMA_HOST and is skipped where none answers; it only
lists models, it never creates any.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import ollama
import pytest
from ollama_double import OllamaDouble, normalize_name  # tests/ is on sys.path (rootdir "prepend" import mode)

from deployment.modelfile import CHATML_TEMPLATE, ModelfileSpec
from deployment.ollama_deploy import (
    HEALTH_PROMPT,
    HealthCheckError,
    OllamaRelease,
    deploy_to_ollama,
    ollama_host,
    point_serving_tag,
    reachable,
)

NAME = "erp-assistant"


@pytest.fixture
def double():
    with OllamaDouble() as d:
        yield d


@pytest.fixture
def spec() -> ModelfileSpec:
    return ModelfileSpec(template=CHATML_TEMPLATE, system="sys", stop=("<|im_end|>",), parameters={"temperature": 0.2})


def fake_gguf(tmp_path: Path, tag: str, size: int = 4096) -> Path:
    """A few KB of bytes with a GGUF magic; different `tag`s give different contents (and digests)."""
    seed = hashlib.sha256(tag.encode()).digest()
    body = (seed * (size // len(seed) + 1))[: size - 4]
    path = tmp_path / tag / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + body)
    return path


def sha256_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ---- reachability -------------------------------------------------------------------------------------

def test_reachable_is_true_for_the_double_and_false_for_a_closed_port():
    d = OllamaDouble()
    url = d.url
    try:
        assert reachable(url) is True
        assert d.requests == [("GET", "/api/tags")]
    finally:
        d.stop()
    assert reachable(url, timeout=1.0) is False  # the double's port, now closed


# ---- a successful deploy ------------------------------------------------------------------------------

def test_deploy_uploads_blob_creates_release_and_points_latest_at_it(double, spec, tmp_path):
    gguf = fake_gguf(tmp_path, "v7")
    digest = sha256_digest(gguf)

    release = deploy_to_ollama(double.url, NAME, "7", gguf, spec)

    assert isinstance(release, OllamaRelease)
    assert (release.host, release.release_tag, release.serving_tag) == (double.url, f"{NAME}:v7", f"{NAME}:latest")
    assert release.digest == digest
    assert double.blobs == {digest: gguf.read_bytes()}

    v7 = double.models[f"{NAME}:v7"]
    assert v7["files"] == {"model.gguf": digest}
    assert v7["template"] == CHATML_TEMPLATE
    assert v7["system"] == "sys"
    assert v7["parameters"] == {"temperature": 0.2, "stop": ["<|im_end|>"]}

    latest = double.models[f"{NAME}:latest"]
    assert latest["copied_from"] == f"{NAME}:v7"
    assert latest["digest"] == v7["digest"]
    assert release.health_answer == double.answer and release.health_answer.strip()

    assert double.requests == [
        ("POST", f"/api/blobs/{digest}"),
        ("POST", "/api/create"),
        ("POST", "/api/generate"),
        ("POST", "/api/copy"),
    ]
    create = next(body for m, p, body in double.request_json if p == "/api/create")
    assert create["model"] == f"{NAME}:v7" and create["stream"] is False
    generate = next(body for m, p, body in double.request_json if p == "/api/generate")
    assert generate["model"] == f"{NAME}:v7" and generate["prompt"] == HEALTH_PROMPT
    assert generate["options"] == {"num_predict": 24, "temperature": 0}


def test_a_deployed_release_reads_back_through_the_official_client(double, spec, tmp_path):
    deploy_to_ollama(double.url, NAME, "7", fake_gguf(tmp_path, "v7"), spec)
    client = ollama.Client(host=double.url)

    shown = client.show(f"{NAME}:v7")
    assert shown.template == CHATML_TEMPLATE
    assert 'SYSTEM """sys"""' in shown.modelfile
    assert '"<|im_end|>"' in shown.parameters and "temperature" in shown.parameters
    listed = {m.model: m.digest for m in client.list().models}
    assert set(listed) == {f"{NAME}:v7", f"{NAME}:latest"}
    assert listed[f"{NAME}:v7"] == listed[f"{NAME}:latest"]
    assert client.show(NAME).template == CHATML_TEMPLATE  # no tag means :latest


# ---- failed health checks -----------------------------------------------------------------------------

def test_empty_health_answer_deletes_the_release_and_keeps_latest_on_the_old_one(double, spec, tmp_path):
    old = deploy_to_ollama(double.url, NAME, "6", fake_gguf(tmp_path, "v6"), spec)
    assert double.models[f"{NAME}:latest"]["copied_from"] == f"{NAME}:v6"
    old_latest = dict(double.models[f"{NAME}:latest"])
    double.requests.clear()

    double.answer = ""  # the new build answers nothing
    new_gguf = fake_gguf(tmp_path, "v7")
    with pytest.raises(HealthCheckError, match=f"{NAME}:v7"):
        deploy_to_ollama(double.url, NAME, "7", new_gguf, spec)

    assert f"{NAME}:v7" not in double.models
    assert f"{NAME}:v6" in double.models
    latest = double.models[f"{NAME}:latest"]
    assert latest["copied_from"] == f"{NAME}:v6"
    assert latest["files"] == {"model.gguf": old.digest} != {"model.gguf": sha256_digest(new_gguf)}
    assert latest == old_latest
    assert ("DELETE", "/api/delete") in double.requests
    assert ("POST", "/api/copy") not in double.requests
    delete = next(body for m, p, body in double.request_json if p == "/api/delete")
    assert delete == {"model": f"{NAME}:v7"}


def test_a_server_error_during_the_health_check_also_rolls_back(double, spec, tmp_path):
    deploy_to_ollama(double.url, NAME, "6", fake_gguf(tmp_path, "v6"), spec)
    double.generate_error = "llama runner process has terminated"

    with pytest.raises(ollama.ResponseError) as err:
        deploy_to_ollama(double.url, NAME, "7", fake_gguf(tmp_path, "v7"), spec)

    assert err.value.status_code == 500
    assert "llama runner" in err.value.error
    assert f"{NAME}:v7" not in double.models
    assert double.models[f"{NAME}:latest"]["copied_from"] == f"{NAME}:v6"


# ---- rollback -----------------------------------------------------------------------------------------

def test_point_serving_tag_makes_latest_a_copy_of_the_earlier_release_again(double, spec, tmp_path):
    deploy_to_ollama(double.url, NAME, "6", fake_gguf(tmp_path, "v6"), spec)
    deploy_to_ollama(double.url, NAME, "7", fake_gguf(tmp_path, "v7"), spec)
    assert double.models[f"{NAME}:latest"]["copied_from"] == f"{NAME}:v7"

    assert point_serving_tag(double.url, NAME, "6") == f"{NAME}:v6"

    latest = double.models[f"{NAME}:latest"]
    assert latest["copied_from"] == f"{NAME}:v6"
    assert latest["digest"] == double.models[f"{NAME}:v6"]["digest"] != double.models[f"{NAME}:v7"]["digest"]
    assert f"{NAME}:v7" in double.models  # rollback keeps the newer release around
    assert double.requests[-2:] == [("POST", "/api/generate"), ("POST", "/api/copy")]  # health-checked first


def test_point_serving_tag_to_an_unknown_release_fails_and_leaves_latest(double, spec, tmp_path):
    deploy_to_ollama(double.url, NAME, "7", fake_gguf(tmp_path, "v7"), spec)

    with pytest.raises(ollama.ResponseError) as err:
        point_serving_tag(double.url, NAME, "5")

    assert err.value.status_code == 404
    assert double.models[f"{NAME}:latest"]["copied_from"] == f"{NAME}:v7"


def test_point_serving_tag_refuses_a_release_that_answers_nothing(double, spec, tmp_path):
    deploy_to_ollama(double.url, NAME, "6", fake_gguf(tmp_path, "v6"), spec)
    deploy_to_ollama(double.url, NAME, "7", fake_gguf(tmp_path, "v7"), spec)
    double.answers[f"{NAME}:v6"] = "  "

    with pytest.raises(HealthCheckError):
        point_serving_tag(double.url, NAME, "6")

    assert double.models[f"{NAME}:latest"]["copied_from"] == f"{NAME}:v7"


# ---- the double itself behaves like Ollama where the tests above rely on it ------------------------------

def test_double_blob_endpoints_check_the_digest(double):
    body = b"GGUF" + bytes(range(256)) * 8
    good = "sha256:" + hashlib.sha256(body).hexdigest()
    wrong = "sha256:" + "0" * 64

    assert httpx.head(f"{double.url}/api/blobs/{good}").status_code == 404
    bad = httpx.post(f"{double.url}/api/blobs/{wrong}", content=body)
    assert bad.status_code == 400 and "error" in bad.json()
    assert wrong not in double.blobs
    assert httpx.post(f"{double.url}/api/blobs/{good}", content=body).status_code == 201
    assert httpx.head(f"{double.url}/api/blobs/{good}").status_code == 200
    assert double.blobs[good] == body


def test_double_create_needs_the_blob_and_streams_when_asked(double):
    client = ollama.Client(host=double.url)
    missing = "sha256:" + "1" * 64
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="m", files={"m.gguf": missing}, stream=False)
    assert err.value.status_code == 400
    assert "m:latest" not in double.models

    body = b"GGUF-bytes"
    double.blobs["sha256:" + hashlib.sha256(body).hexdigest()] = body
    statuses = [p.status for p in client.create(model="m", files={"m.gguf": "sha256:" + hashlib.sha256(body).hexdigest()},
                                                 template="{{ .Prompt }}", stream=True)]
    assert statuses[-1] == "success" and len(statuses) > 1
    assert normalize_name("m") == "m:latest" and "m:latest" in double.models


def test_double_generate_streams_the_canned_answer_and_404s_unknown_models(double):
    body = b"GGUF-bytes"
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    double.blobs[digest] = body
    client = ollama.Client(host=double.url)
    client.create(model="m:v1", files={"m.gguf": digest}, stream=False)
    double.answer = "three short words"

    chunks = list(client.generate(model="m:v1", prompt="hi", stream=True))
    assert "".join(c.response for c in chunks) == "three short words"
    assert chunks[-1].done is True and chunks[-1].done_reason == "stop"
    assert all(c.done is False for c in chunks[:-1])

    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="hi")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nope", "other")
    assert err.value.status_code == 404 and "other:latest" not in double.models


# ---- a real server, where one answers ----------------------------------------------------------------

@pytest.mark.ollama_server
def test_a_real_ollama_server_lists_models():
    host = ollama_host(None)
    if not reachable(host):
        pytest.skip(f"no Ollama server answers at {host} (set OLLAMA_HOST to point at one)")
    assert isinstance(ollama.Client(host=host).list(), ollama.ListResponse)
