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
    HEALTH_PROMPTS,
    HealthCheckError,
    UploadError,
    answer_problems,
    env_tags,
    ollama_host,
    prepare_model,
    reachable,
    set_env_tags,
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


# ---- health: what a healthy answer is (pure) ------------------------------------------------------------

TOKENS = ("<|im_start|>", "<|im_end|>")


def test_a_healthy_answer_has_no_problems():
    assert answer_problems("ko", "구매 요청 메뉴에서 등록하세요.", 0.5, 10, TOKENS) == []
    assert answer_problems("en", "Open the purchase request screen.", 0.5, 10, TOKENS) == []


def test_each_unhealthy_kind_is_named():
    assert answer_problems("ko", "   ", 0.1, 10, TOKENS) == ["empty answer"]
    assert answer_problems("ko", "Open the purchase request screen.", 0.1, 10, TOKENS) == ["answered in en, asked in ko"]
    assert answer_problems("en", "12345", 0.1, 10, TOKENS) == ["answered in no language, asked in en"]
    leak = answer_problems("en", "Save it.<|im_end|><|im_start|>user", 0.1, 10, TOKENS)
    assert leak == ["template tokens in the answer: ['<|im_start|>', '<|im_end|>']"]
    assert answer_problems("en", "Save it.", 12.5, 10, TOKENS) == ["took 12.5 s (bound 10.0 s)"]


# ---- preparing a release tag -------------------------------------------------------------------------------

def prepare(double, gguf, spec, release="v7-20261204000000", prompts=HEALTH_PROMPTS, bound=30.0, timeout=30.0):
    return prepare_model(double.url, NAME, release, gguf, hashlib.sha256(gguf.read_bytes()).hexdigest(), spec, prompts,
                         bound, timeout)


def test_prepare_uploads_the_verified_blob_creates_the_release_and_asks_every_golden_prompt(double, spec, tmp_path):
    gguf = fake_gguf(tmp_path, "v7")
    digest = sha256_digest(gguf)

    prepared = prepare(double, gguf, spec)
    tag, health = prepared.tag, prepared.health

    assert set(prepared.seconds) == {"upload", "create", "health"}
    assert tag == f"{NAME}:v7-20261204000000" and double.blobs == {digest: gguf.read_bytes()}
    rec = double.models[tag]
    assert rec["files"] == {"model.gguf": digest} and rec["template"] == CHATML_TEMPLATE and rec["system"] == "sys"
    assert rec["parameters"] == {"temperature": 0.2, "stop": ["<|im_end|>"]}
    assert [h.lang for h in health] == ["ko", "en"] and all(not h.problems and h.answer for h in health)
    asked = [body["prompt"] for m, p, body in double.request_json if p == "/api/generate"]
    assert asked == [p["prompt"] for p in HEALTH_PROMPTS]
    blob_at = double.requests.index(("POST", f"/api/blobs/{digest}"))
    assert double.requests[blob_at + 1] == ("HEAD", f"/api/blobs/{digest}")  # stored, checked, then created
    assert double.requests[blob_at + 2] == ("POST", "/api/create")
    assert f"{NAME}:staging" not in double.models  # preparing switches nothing


def test_a_file_that_is_not_the_releases_gguf_is_never_uploaded(double, spec, tmp_path):
    gguf = fake_gguf(tmp_path, "v7")
    with pytest.raises(UploadError, match="refusing to upload"):
        prepare_model(double.url, NAME, "v7-x", gguf, "0" * 64, spec, HEALTH_PROMPTS, 30, 30)
    assert double.blobs == {} and double.models == {}


def test_a_release_tag_that_fails_its_health_check_is_deleted(double, spec, tmp_path):
    double.answers[f"{NAME}:v7-x"] = "Open the screen and save."  # English to a Korean question
    with pytest.raises(HealthCheckError, match="answered in en, asked in ko"):
        prepare(double, fake_gguf(tmp_path, "v7"), spec, release="v7-x")
    assert f"{NAME}:v7-x" not in double.models
    assert ("DELETE", "/api/delete") in double.requests


def test_a_500_during_create_leaves_no_tag(double, spec, tmp_path):
    double.create_error = "unsupported architecture"
    with pytest.raises(ollama.ResponseError) as err:
        prepare(double, fake_gguf(tmp_path, "v7"), spec)
    assert err.value.status_code == 500 and double.models == {}


def test_an_upload_that_times_out_leaves_no_tag(double, spec, tmp_path):
    double.blob_delay_s = 3.0
    with pytest.raises(Exception) as err:
        prepare(double, fake_gguf(tmp_path, "v7"), spec, timeout=0.5)
    assert "timed out" in str(err.value).lower() or "timeout" in type(err.value).__name__.lower()
    assert double.models == {}


def test_a_slow_model_fails_the_latency_bound(double, spec, tmp_path):
    double.generate_delay_s = 0.3
    with pytest.raises(HealthCheckError, match=r"bound 0\.1 s"):
        prepare(double, fake_gguf(tmp_path, "v7"), spec, bound=0.1)
    assert double.models == {}


def test_preparing_a_tag_the_server_has_only_health_checks_it(double, spec, tmp_path):
    gguf = fake_gguf(tmp_path, "v7")
    prepare(double, gguf, spec)
    double.requests.clear()
    prepare(double, gguf, spec)
    assert ("POST", "/api/create") not in double.requests and not any(p.startswith("/api/blobs") for _, p in double.requests)


# ---- blue/green env tags -----------------------------------------------------------------------------------

def test_env_tags_move_blue_green_and_the_env_tag_is_unloaded(double, spec, tmp_path):
    a = prepare(double, fake_gguf(tmp_path, "a"), spec, release="a").tag
    b = prepare(double, fake_gguf(tmp_path, "b"), spec, release="b").tag

    set_env_tags(double.url, NAME, "prod", a, None)
    assert double.models[f"{NAME}:prod"]["copied_from"] == a and f"{NAME}:prod-previous" not in double.models
    set_env_tags(double.url, NAME, "prod", b, a)
    assert double.models[f"{NAME}:prod"]["digest"] == double.models[b]["digest"]
    assert double.models[f"{NAME}:prod-previous"]["digest"] == double.models[a]["digest"]
    assert double.unloaded == [f"{NAME}:prod", f"{NAME}:prod"]  # the old template must not stay in memory
    assert env_tags(double.url, NAME, "prod") == {"prod": double.models[b]["digest"],
                                                   "prod-previous": double.models[a]["digest"]}
    set_env_tags(double.url, NAME, "prod", None, None)  # a first release undone: nothing serves
    assert env_tags(double.url, NAME, "prod") == {"prod": None, "prod-previous": None}
    assert a in double.models and b in double.models  # release tags are not the env's to delete


def test_a_deployed_release_reads_back_through_the_official_client(double, spec, tmp_path):
    tag = prepare(double, fake_gguf(tmp_path, "v7"), spec).tag
    set_env_tags(double.url, NAME, "staging", tag, None)
    client = ollama.Client(host=double.url)
    shown = client.show(f"{NAME}:staging")
    assert shown.template == CHATML_TEMPLATE and 'SYSTEM """sys"""' in shown.modelfile
    assert '"<|im_end|>"' in shown.parameters and "temperature" in shown.parameters
    listed = {m.model: m.digest for m in client.list().models}
    assert listed[tag] == listed[f"{NAME}:staging"]


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
