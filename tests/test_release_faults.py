"""Release faults at the edges of a switch (deployment/deploy.py, deployment/rollout.py, flows/release.py): a release
whose Ollama half was skipped, a canary abort after a switch stopped half-way, work that fails after a switch
happened, a rollback whose serving half cannot follow, a bundle whose manifest disagrees with its Modelfile, and the
temporary GGUF downloads. Real Milvus Lite, a real MLflow registry (sqlite), the Ollama test double; what serves is
read off the three systems themselves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ollama_double import OllamaDouble
from test_release import NAME, SPEC, _repack, double, release, serving, setup  # noqa: F401 (fixtures)
from test_vector_store import DOCS

from conftest import REPO
from deployment import deploy as D
from deployment.releases import ReleaseLedger, pending_switch
from deployment.vector_store import open_milvus

pytestmark = pytest.mark.integration
DOWN = "http://127.0.0.1:9"
"""An Ollama host nothing listens on."""


def serves(double, r) -> dict:
    """What `serving` reads off the three systems when an environment serves release `r` in full."""
    return {"collection": r.collection, "ollama": double.model(r.ollama_tag)["digest"], "registry": r.model_version}


def _tail(settings, env: str, n: int) -> list[str]:
    return [e.action for e in ReleaseLedger(settings).events() if e.env == env][-n:]


def _fail_once(real, message: str):
    """`real`, except that its first call raises RuntimeError(message)."""
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(message)
        return real(*a, **k)
    return wrapped


def test_a_release_whose_ollama_half_was_skipped_never_blocks_later_switches(setup, double, monkeypatch):
    cfg, settings, ggufs, _ = setup
    down = cfg.model_copy(update={"ollama_host": DOWN})
    r1 = release(setup, "dev", "1", cfg=down)
    assert r1.ollama.startswith("skipped") and double.model(r1.release.ollama_tag) is None

    # Ollama answers again. A switch to v2 fails in its last step; its undo goes back to r1, which has no model on
    # the server: the env tag the switch copied is deleted, not copied from a tag that does not exist
    real_alias = D._set_registry_alias

    def registry_refuses_v2(settings, alias, version, *rest):
        if version == "2":
            raise RuntimeError("injected: registry down")
        real_alias(settings, alias, version, *rest)

    with monkeypatch.context() as m:
        m.setattr(D, "_set_registry_alias", registry_refuses_v2)
        with pytest.raises(D.ReleaseError, match="registry down"):
            release(setup, "dev", "2")
    assert serving(setup, double, "dev") == {"collection": r1.release.collection, "ollama": None, "registry": "1"}
    assert _tail(settings, "dev", 2) == ["switching", "failed"]

    r2 = release(setup, "dev", "2").release  # previous is r1: `dev-previous` is not copied from a missing tag
    assert serving(setup, double, "dev") == serves(double, r2)
    assert double.model(f"{NAME}:dev-previous") is None

    # back to r1: its model is created from the registered GGUF first, then both halves switch
    D.rollback_env(cfg, settings, "dev", "tester", gguf_for=lambda rel: (ggufs[rel.model_version], SPEC))
    assert serving(setup, double, "dev") == serves(double, r1.release)
    assert pending_switch(ReleaseLedger(settings).events(), "dev") is None


def test_a_rollback_whose_earlier_release_was_collected_switches(setup, double):
    cfg, settings, _, _ = setup
    cfg = cfg.model_copy(update={"keep_releases": 1})
    made = [release(setup, "staging", v, cfg=cfg).release for v in ("1", "2", "3")]
    assert double.model(made[0].ollama_tag) is None  # r1 collected: it is neither current nor previous

    out = D.rollback_env(cfg, settings, "staging", "tester")  # r2 serves; what it had before (r1) is gone
    assert out.release == made[1]
    assert serving(setup, double, "staging") == serves(double, made[1])
    assert double.model(f"{NAME}:staging-previous") is None


CRASH_PROMOTION = """
import json, os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from deployment import deploy as D
from erpops.config import DeployConfig, MLflowSettings
a = json.loads(sys.argv[1])
D.set_env_tags = lambda *args, **kw: os._exit(9)   # the promotion dies between the two halves
D.switch_release(DeployConfig(**a["cfg"]), MLflowSettings(**a["settings"]), "staging", a["release"], "crash")
"""


def test_an_abort_after_a_promotion_killed_half_way_puts_the_environment_back(setup, double, tmp_path):
    from deployment.rollout import abort_canary, start_canary

    cfg, settings, ggufs, _ = setup
    release(setup, "staging", "1")
    before = serving(setup, double, "staging")
    state = start_canary(cfg, settings, "staging", "2", ggufs["2"], SPEC, DOCS, None, "tester").state
    script = tmp_path / "crash.py"
    script.write_text(CRASH_PROMOTION.format(repo=str(REPO), tests=str(REPO / "tests")))
    args = {"cfg": cfg.model_dump(mode="json"), "settings": settings.model_dump(mode="json"),
            "release": state.release_id}
    proc = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert serving(setup, double, "staging")["collection"] != before["collection"]  # half-switched

    abort_canary(cfg, settings, "staging", "operator", "the chat service died mid-promotion")
    assert serving(setup, double, "staging") == before
    assert _tail(settings, "staging", 3) == ["switching", "reconcile", "failed"]


def test_an_abort_puts_back_a_promotion_whose_undo_failed(setup, double, monkeypatch):
    from deployment.rollout import CanaryError, promote_canary, start_canary

    cfg, settings, ggufs, _ = setup
    release(setup, "staging", "1")
    before = serving(setup, double, "staging")
    state = start_canary(cfg, settings, "staging", "2", ggufs["2"], SPEC, DOCS, None, "tester").state
    calls = []
    real_point = D.point_alias

    def undo_fails(uri, alias, collection):  # the switch's alias moves, the undo's does not
        calls.append(collection)
        if len(calls) == 2:
            raise RuntimeError("injected: Milvus went away during the undo")
        return real_point(uri, alias, collection)

    monkeypatch.setattr(D, "point_alias", undo_fails)
    monkeypatch.setattr(D, "set_env_tags", _fail_once(D.set_env_tags, "injected: Ollama copy failed"))
    with pytest.raises(CanaryError, match="promotion failed"):
        promote_canary(cfg, settings, "staging", "tester", full=True)
    assert serving(setup, double, "staging") == before
    assert _tail(settings, "staging", 3) == ["switching", "reconcile", "failed"]
    assert ReleaseLedger(settings).events()[-1].release_id == state.release_id


def test_retention_failing_after_a_switch_is_a_warning_not_a_failed_release(setup, double, monkeypatch):
    from pymilvus import MilvusException

    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release

    def broken(*a, **k):
        raise MilvusException(message="injected: drop_collection timed out")

    monkeypatch.setattr(D, "collect", broken)
    out = release(setup, "staging", "2")
    assert len(out.warnings) == 1 and "drop_collection timed out" in out.warnings[0] and out.collected == {}
    assert serving(setup, double, "staging") == serves(double, out.release)
    assert ReleaseLedger(settings).serving("staging") == (out.release.release_id, r1.release_id)

    prepared = D.prepare_release(cfg, settings, "staging", "3", ggufs["3"], SPEC, DOCS, None, "tester")
    switched = D.switch_release(cfg, settings, "staging", prepared.release.release_id, "tester")  # a canary's promotion
    assert "drop_collection timed out" in switched.warnings[0]
    assert serving(setup, double, "staging") == serves(double, prepared.release)


def test_a_failed_switch_whose_undo_failed_reports_the_switch_and_is_collected_later(setup, double, monkeypatch):
    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    calls = []
    real_point = D.point_alias

    def undo_fails(uri, alias, collection):
        calls.append(collection)
        if len(calls) == 2:
            raise RuntimeError("injected: Milvus went away during the undo")
        return real_point(uri, alias, collection)

    with monkeypatch.context() as m:
        m.setattr(D, "point_alias", undo_fails)
        m.setattr(D, "set_env_tags", _fail_once(D.set_env_tags, "injected: Ollama copy failed"))
        with pytest.raises(D.ReleaseError, match="Ollama copy failed") as err:  # not the clean-up's KBHealthError
            release(setup, "staging", "2")
    stuck = err.value.outcome.release
    assert pending_switch(ReleaseLedger(settings).events(), "staging") is not None

    third = release(setup, "staging", "3")  # reconciles first; the stuck build is then collected
    assert stuck.collection in third.collected["collections_dropped"]
    assert ReleaseLedger(settings).serving("staging") == (third.release.release_id, r1.release_id)


def test_rollback_serving_puts_the_champion_back_whatever_stops_serving_from_following(setup, double, monkeypatch):
    from pymilvus import MilvusException

    from registry.promote import read_champion

    cfg, settings, _, client = setup
    release(setup, "staging", "1")
    release(setup, "staging", "2")
    client.set_registered_model_alias(settings.registered_model_name, "champion", "2")
    client.set_registered_model_alias(settings.registered_model_name, "previous", "1")
    before = serving(setup, double, "staging")

    def down(uri):
        raise MilvusException(message="injected: Fail connecting to server on 127.0.0.1:19530")

    with monkeypatch.context() as m:
        m.setattr(D, "open_milvus", down)
        with pytest.raises(MilvusException, match="Fail connecting"):
            D.rollback_serving(cfg, settings, "staging", "tester", "bad answers")
    assert read_champion(settings).version == "2"
    aliases = {a: str(v) for a, v in client.get_registered_model(settings.registered_model_name).aliases.items()}
    assert (aliases["champion"], aliases["previous"]) == ("2", "1")
    assert serving(setup, double, "staging") == before


def _site(tmp_path: Path):
    from erpops.config import MLflowSettings

    site = tmp_path / "site"
    return site, MLflowSettings(tracking_uri=f"sqlite:///{site}/mlflow.db", artifact_location=str(site / "art"))


def test_a_bundle_whose_manifest_spec_is_not_its_modelfile_is_refused_before_anything_is_written(setup, double,
                                                                                                   tmp_path):
    from deployment.bundle import MANIFEST, BundleError, export_bundle

    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    bundle = export_bundle(r1, ggufs["1"], SPEC, cfg.milvus_uri, tmp_path / "out" / "r1.tar.gz")

    def tamper(work: Path):  # checksums untouched: only the settings the Ollama model is created from
        manifest = json.loads((work / MANIFEST).read_text())
        manifest["modelfile_spec"].update(system="sYs", stop=[])
        (work / MANIFEST).write_text(json.dumps(manifest))

    bad = _repack(bundle, tmp_path / "bad.tar.gz", tamper)
    site, site_settings = _site(tmp_path)
    with OllamaDouble() as site_ollama:
        site_cfg = cfg.model_copy(update={"milvus_uri": str(site / "kb.db"), "ollama_host": site_ollama.url})
        with pytest.raises(BundleError, match=r"manifest\.json's modelfile_spec is not the bundled Modelfile") as err:
            D.import_release(site_cfg, site_settings, "prod", bad, "ops", "CAB-1")
        assert 'SYSTEM """sYs"""' in str(err.value) and 'PARAMETER stop "<|im_end|>"' in str(err.value)
        assert site_ollama.models == {} and site_ollama.blobs == {}
        assert not (site / "kb.db").exists() and ReleaseLedger(site_settings).events() == []


def test_a_bundle_embedded_with_what_this_site_lacks_is_refused_and_a_skipped_ollama_points_at_the_bundle(
        setup, double, tmp_path):
    from deployment.bundle import MANIFEST, BundleError, export_bundle
    from test_providers import free_port

    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    bundle = export_bundle(r1, ggufs["1"], SPEC, cfg.milvus_uri, tmp_path / "out" / "r1.tar.gz")

    def other_embedder(work: Path):
        manifest = json.loads((work / MANIFEST).read_text())
        manifest["release"]["embedding_model"] = "an-embedder-only-the-source-site-has"
        (work / MANIFEST).write_text(json.dumps(manifest))

    site, site_settings = _site(tmp_path)
    site_cfg = cfg.model_copy(update={"milvus_uri": str(site / "kb.db"),
                                      "ollama_host": f"http://127.0.0.1:{free_port()}"})  # no Ollama at the site
    with pytest.raises(BundleError, match="an-embedder-only-the-source-site-has.*nothing imported"):
        D.import_release(site_cfg, site_settings, "prod", _repack(bundle, tmp_path / "e.tar.gz", other_embedder),
                         "ops", "CAB-1")
    assert not (site / "kb.db").exists() and ReleaseLedger(site_settings).events() == []

    import mlflow

    site_registry = mlflow.MlflowClient(site_settings.tracking_uri, site_settings.tracking_uri)
    site_registry.create_registered_model(site_settings.registered_model_name)  # the site's own v1: another model
    site_registry.create_model_version(site_settings.registered_model_name, source=str(site), tags={"gguf_sha256": "f" * 64})
    out = D.import_release(site_cfg, site_settings, "prod", bundle, "ops", "CAB-1")
    assert out.ollama_skipped and out.ollama.endswith(f"bundle to import by hand: {bundle}")  # not a folder now gone
    assert ReleaseLedger(site_settings).serving("prod") == (r1.release_id, None)
    assert "prod" not in site_registry.get_registered_model(site_settings.registered_model_name).aliases


def test_a_bundle_import_whose_switch_fails_leaves_no_collection_or_tag(setup, double, tmp_path, monkeypatch):
    from deployment.bundle import export_bundle

    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    bundle = export_bundle(r1, ggufs["1"], SPEC, cfg.milvus_uri, tmp_path / "out" / "r1.tar.gz")
    site, site_settings = _site(tmp_path)
    with OllamaDouble() as site_ollama:
        site_cfg = cfg.model_copy(update={"milvus_uri": str(site / "kb.db"), "ollama_host": site_ollama.url})
        monkeypatch.setattr(D, "set_env_tags", _fail_once(D.set_env_tags, "injected: Ollama copy failed"))
        with pytest.raises(D.ReleaseError, match="Ollama copy failed"):
            D.import_release(site_cfg, site_settings, "prod", bundle, "ops", "CAB-1")
        with open_milvus(site_cfg.milvus_uri) as c:
            assert c.list_collections() == []
        assert site_ollama.models == {}
        assert _tail(site_settings, "prod", 2) == ["switching", "failed"]

        D.import_release(site_cfg, site_settings, "prod", bundle, "ops", "CAB-1")  # the same bundle, again
        assert ReleaseLedger(site_settings).serving("prod") == (r1.release_id, None)


def test_a_gguf_fetched_from_the_registry_is_removed_once_the_model_is_created(setup, double, monkeypatch):
    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    fetched = []

    def registered_bundle(tracking_uri, model, version, dest: Path):
        fetched.append(dest)
        gguf = dest / "model.gguf"
        shutil.copy(ggufs[version], gguf)
        return gguf, SPEC

    monkeypatch.setattr(D, "registered_bundle", registered_bundle)
    with OllamaDouble() as prod_host:
        envs = {**cfg.environments, "prod": cfg.environments["prod"].model_copy(update={"ollama_host": prod_host.url})}
        cfg2 = cfg.model_copy(update={"environments": envs})
        D.promote_env(cfg2, settings, "staging", "prod", "kim", "ok", gguf_for=D.registry_gguf_fetcher(settings))
        assert prod_host.model(f"{NAME}:prod")["digest"] == prod_host.model(r1.ollama_tag)["digest"]
    assert len(fetched) == 1 and not fetched[0].exists()


@pytest.fixture
def release_flow(setup, tmp_path, monkeypatch):
    """flows.release.release's body with its Prefect tasks as the plain functions (the registry download copies a
    fake GGUF), on a recipe whose deploy section is the `setup` world's. Returns (run, downloads)."""
    from flows import release as F
    from flows import steps

    cfg, settings, ggufs, _ = setup
    text = (REPO / "recipes" / "tiny" / "test.yaml").read_text()
    deploy = f"milvus_uri: {cfg.milvus_uri}\n  chunk_chars: 400\n  health_max_latency_s: 30\n  ollama_timeout_s: 30"
    for old, new in (("root: data/erp", f"root: {tmp_path / 'corpus'}"), ("milvus_uri: .erpops/milvus.db", deploy),
                     ("output_root: .erpops/runs", f"output_root: {tmp_path / 'runs'}")):
        text = text.replace(old, new)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    mlflow_config = tmp_path / "mlflow.yaml"
    mlflow_config.write_text(f"tracking_uri: {settings.tracking_uri}\n"
                             f"artifact_location: {settings.artifact_location}\n")
    downloads = []

    def bundle(tracking_uri, model, version, dest: Path):
        downloads.append(dest)
        (dest / "model").mkdir()
        return Path(shutil.copy(ggufs[version], dest / "model" / "model.gguf")), SPEC

    validate = SimpleNamespace(with_options=lambda **_: lambda *a: SimpleNamespace(docs=DOCS))
    for name, fn in {"bundle_task": bundle, "validate_task": validate, "release_task": D.release_version}.items():
        monkeypatch.setattr(steps, name, fn)
    monkeypatch.setattr(F, "setup_process", lambda: None)

    def run(version: str, **kw):
        return F.release.fn(str(recipe), str(mlflow_config), version=version, env="staging", **kw)
    return run, downloads


def test_the_release_flow_keeps_a_switched_release_whose_tags_fail_and_removes_its_download(
        setup, double, release_flow, monkeypatch):
    from flows import steps

    _, settings, _, client = setup
    run, downloads = release_flow
    monkeypatch.setenv("OLLAMA_HOST", double.url)

    def registry_down(*a, **k):
        raise ConnectionError("injected: registry unreachable")

    monkeypatch.setattr(steps, "tag_task", registry_down)
    client.set_registered_model_alias(settings.registered_model_name, "champion", "1")
    summary = run("1", restore={"set": {"champion": "1"}, "delete": [], "before": {}})

    assert isinstance(summary, dict) and summary["ok"]  # not a Failed state: the release serves
    switch = next(s for s in summary["stages"] if s["name"] == "switch")
    assert switch["status"] == "ok" and "registry unreachable" in switch["outputs"]["warnings"][0]
    aliases = {a: str(v) for a, v in client.get_registered_model(settings.registered_model_name).aliases.items()}
    assert aliases == {"champion": "1", "staging": "1"}  # the promotion was not undone
    assert serving(setup, double, "staging")["collection"] == summary["outputs"]["collection"]
    assert len(downloads) == 1 and not downloads[0].exists()


def test_the_release_flow_keeps_the_download_when_the_ollama_half_was_skipped(setup, double, release_flow, monkeypatch):
    from flows import steps

    run, downloads = release_flow
    monkeypatch.setenv("OLLAMA_HOST", DOWN)
    monkeypatch.setattr(steps, "tag_task", lambda *a, **k: None)
    summary = run("1")
    ollama = next(s for s in summary["stages"] if s["name"] == "deploy_ollama")
    assert ollama["status"] == "skipped" and str(downloads[0]) in ollama["reason"]
    assert (downloads[0] / "model" / "model.gguf").is_file()  # the folder the message points at, to import by hand
    shutil.rmtree(downloads[0])


def test_a_failed_release_whose_alias_restore_fails_still_writes_its_summary(setup, release_flow, monkeypatch):
    """The registry goes away under a release: the download fails, then the champion's put-back fails too. The flow
    still ends Failed with its summary written, and the summary says the aliases stayed where they are."""
    import json

    from flows import release as F
    from flows import steps

    run, _ = release_flow

    def registry_down(*a, **k):
        raise ConnectionError("injected: registry unreachable")

    monkeypatch.setattr(steps, "bundle_task", registry_down)
    monkeypatch.setattr(F, "restore_aliases", registry_down)
    state = run("1", restore={"set": {"champion": "1"}, "delete": [], "before": {}})
    assert state.is_failed() and "NOT put back" in state.message
    summary = json.loads(Path(state.message.rsplit("summary: ", 1)[1]).read_text())
    kb = next(s for s in summary["stages"] if s["name"] == "deploy_kb")
    assert kb["status"] == "failed" and "registry unreachable" in kb["reason"] and "erpops promote" in kb["reason"]


def test_an_env_tag_the_server_cannot_delete_fails_the_switch_and_it_is_put_back(setup, double):
    """The first release of an environment deletes `<env>-previous`; a server that cannot (HTTP 500, not a missing
    tag) fails the switch as a failed copy does, and the undo puts the environment back to serving nothing."""
    _, settings, _, _ = setup
    before = serving(setup, double, "dev")
    double.delete_failures = 1
    with pytest.raises(D.ReleaseError, match="could not be written"):
        release(setup, "dev", "1")
    assert double.delete_failures == 0 and serving(setup, double, "dev") == before
    assert ReleaseLedger(settings).serving("dev") == (None, None) and _tail(settings, "dev", 2) == ["switching", "failed"]


def test_retention_spares_a_fresh_build_no_event_names_yet(setup, double, monkeypatch):
    """A canary's release is built (the release lock let go) before its start is written under the canary lock:
    a retention run in between keeps it; a build left so for longer than the grace (a start that never came) goes."""
    cfg, settings, ggufs, _ = setup
    release(setup, "staging", "1")
    prepared = D.prepare_release(cfg, settings, "staging", "2", ggufs["2"], SPEC, DOCS, None, "tester").release
    assert prepared.collection not in release(setup, "staging", "3").collected["collections_dropped"]
    with open_milvus(cfg.milvus_uri) as c:
        assert c.has_collection(prepared.collection)
    monkeypatch.setattr(D, "PREPARED_GRACE_S", 0.0)
    assert prepared.collection in D.collect(cfg, settings)["collections_dropped"]
