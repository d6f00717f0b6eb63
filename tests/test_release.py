"""Releases as one unit (deployment/deploy.py): real Milvus Lite, a real MLflow registry (sqlite), the Ollama test
double. Switches, blue/green tags, rollback, promote-env with approval, retention, and the fault drills: after each
fault, what serves is unchanged and no half-built tag or collection remains (or the next command collects it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ollama_double import OllamaDouble
from test_ollama import fake_gguf
from test_vector_store import DOCS

from conftest import REPO, erpops_cli
from deployment import deploy as D
from deployment.modelfile import CHATML_TEMPLATE, ModelfileSpec
from deployment.releases import ReleaseEvent, ReleaseLedger, env_stack, pending_switch
from deployment.vector_store import alias_target, open_milvus
from erpops.config import DeployConfig

pytestmark = pytest.mark.integration
NAME = "erp-assistant"
SPEC = ModelfileSpec(template=CHATML_TEMPLATE, system="sys", stop=("<|im_end|>",), parameters={})


@pytest.fixture
def double():
    with OllamaDouble() as d:
        yield d


@pytest.fixture
def setup(tmp_path, mlflow_settings, double):
    """A registry with versions 1-4, each with its run and its own fake GGUF; a deploy config on Milvus Lite and the
    double."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_settings.tracking_uri, mlflow_settings.tracking_uri)
    client.create_registered_model(mlflow_settings.registered_model_name)
    experiment = client.create_experiment("releases", artifact_location=mlflow_settings.artifact_location)
    ggufs = {}
    for v in ("1", "2", "3", "4"):
        run = client.create_run(experiment)
        client.create_model_version(mlflow_settings.registered_model_name, source=str(tmp_path), run_id=run.info.run_id)
        ggufs[v] = fake_gguf(tmp_path, f"v{v}")
    cfg = DeployConfig(milvus_uri=str(tmp_path / "kb.db"), ollama_host=double.url, chunk_chars=400,
                       health_max_latency_s=30, ollama_timeout_s=30)
    return cfg, mlflow_settings, ggufs, client


def release(setup, env, version, **kw):
    cfg, settings, ggufs, _ = setup
    return D.release_version(kw.pop("cfg", cfg), settings, env, version, ggufs[version], SPEC, DOCS, None, "tester", **kw)


def serving(setup, double, env):
    """What env serves, read off the three systems themselves (not the ledger)."""
    cfg, settings, _, client = setup
    with open_milvus(cfg.milvus_uri) as c:
        collection = alias_target(c, f"erp_kb_{env}")
    tag = double.model(f"{NAME}:{env}")
    aliases = {a: str(v) for a, v in client.get_registered_model(settings.registered_model_name).aliases.items()}
    return {"collection": collection, "ollama": tag["digest"] if tag else None, "registry": aliases.get(env)}


def leftovers(setup, double):
    """Collections and Ollama release tags that no release in the ledger owns."""
    cfg, settings, _, _ = setup
    owned = {r.collection for r in ReleaseLedger(settings).releases()}
    with open_milvus(cfg.milvus_uri) as c:
        extra_collections = [n for n in c.list_collections() if n not in owned]
    tags = {r.ollama_tag for r in ReleaseLedger(settings).releases()}
    extra_tags = [m for m in double.models if not m.split(":")[1].startswith(("staging", "prod", "dev")) and m not in tags]
    return extra_collections, extra_tags


def test_a_release_switches_model_collection_and_registry_together(setup, double):
    cfg, settings, _, _ = setup
    first = release(setup, "staging", "1")
    r = first.release
    assert r.model_version == "1" and r.collection == f"erp_kb_{r.release_id.replace('-', '_')}"
    assert r.ollama_tag == f"{NAME}:{r.release_id}" and len(r.gguf_sha256) == 64 and len(r.corpus_digest) == 64
    assert serving(setup, double, "staging") == {"collection": r.collection, "ollama": double.model(r.ollama_tag)["digest"],
                                                 "registry": "1"}
    assert f"{NAME}:staging-previous" not in double.models and double.unloaded == [f"{NAME}:staging"]
    assert [h["lang"] for h in first.health] == ["ko", "en"]
    events = ReleaseLedger(settings).events()
    assert [(e.env, e.action, e.release_id) for e in events] == [("staging", "switching", r.release_id),
                                                                 ("staging", "deploy", r.release_id)]
    assert serving(setup, double, "prod") == {"collection": None, "ollama": None, "registry": None}

    second = release(setup, "staging", "2")
    assert second.previous == r.release_id
    assert serving(setup, double, "staging")["registry"] == "2"
    assert double.model(f"{NAME}:staging-previous")["digest"] == double.model(r.ollama_tag)["digest"]
    # the previous collection is never unloaded by the release (its drain is tested on a Milvus server in
    # test_scale_out: an embedded Milvus Lite file releases every collection when the process lets go of it)
    assert r.collection not in second.collected["collections_unloaded"]


def test_rollback_reverts_all_three_and_the_ledger_tells_the_story(setup, double):
    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    before = serving(setup, double, "staging")
    r2 = release(setup, "staging", "2").release
    out = D.rollback_env(cfg, settings, "staging", "tester", "v2 answers in the wrong language")
    assert out.release.release_id == r1.release_id and out.previous == r2.release_id
    assert serving(setup, double, "staging") == before
    assert f"{NAME}:staging-previous" not in double.models  # nothing before r1
    assert ReleaseLedger(settings).serving("staging") == (r1.release_id, None)
    with pytest.raises(ValueError, match="no earlier release"):
        D.rollback_env(cfg, settings, "staging", "tester")
    rollback = ReleaseLedger(settings).events()[-1]
    assert (rollback.action, rollback.release_id, rollback.from_release, rollback.reason) == (
        "rollback", r1.release_id, r2.release_id, "v2 answers in the wrong language")


def test_promote_env_needs_a_reason_for_prod_and_ships_the_same_release(setup, double):
    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    with pytest.raises(ValueError, match="needs --reason"):
        D.promote_env(cfg, settings, "staging", "prod", "tester", "")
    assert serving(setup, double, "prod")["collection"] is None
    with pytest.raises(ValueError, match="serves no release"):
        D.promote_env(cfg, settings, "dev", "prod", "tester", "go")

    out = D.promote_env(cfg, settings, "staging", "prod", "kim@erp", "CAB-142 approved")
    assert out.release == r1  # nothing rebuilt: same GGUF, same collection
    assert serving(setup, double, "prod") == {"collection": r1.collection, "ollama": double.model(r1.ollama_tag)["digest"],
                                              "registry": "1"}
    last = ReleaseLedger(settings).events()[-1]
    assert (last.env, last.action, last.actor, last.reason) == ("prod", "promote-env", "kim@erp",
                                                                "approved by kim@erp: CAB-142 approved")
    with pytest.raises(ValueError, match="already serves"):
        D.promote_env(cfg, settings, "staging", "prod", "kim@erp", "again")


def test_promote_env_to_another_ollama_host_creates_the_model_there_from_the_registered_gguf(setup, double):
    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    with OllamaDouble() as prod_host:
        envs = {**cfg.environments, "prod": cfg.environments["prod"].model_copy(update={"ollama_host": prod_host.url})}
        cfg2 = cfg.model_copy(update={"environments": envs})
        D.promote_env(cfg2, settings, "staging", "prod", "kim", "ok", gguf_for=lambda rel: (ggufs[rel.model_version], SPEC))
        assert prod_host.model(f"{NAME}:prod")["digest"] == prod_host.model(r1.ollama_tag)["digest"]
        assert f"{NAME}:prod" not in double.models


@pytest.mark.parametrize("fault", ["create_500", "upload_timeout", "health", "milvus_insert"])
def test_a_fault_while_preparing_changes_nothing_that_serves_and_leaves_nothing_behind(setup, double, fault, monkeypatch):
    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    before, models_before = serving(setup, double, "staging"), set(double.models)
    if fault == "create_500":
        double.create_error = "llama runner failed to load model"
    elif fault == "upload_timeout":
        double.blob_delay_s = 3.0
        cfg = cfg.model_copy(update={"ollama_timeout_s": 0.5})
    elif fault == "health":
        double.answer = ""
    else:
        from pymilvus import MilvusClient

        from deployment import vector_store as V

        monkeypatch.setattr(V, "INSERT_BATCH", 1)
        real, calls = MilvusClient.insert, []

        def flaky(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected: insert failed half-way")
            return real(self, *a, **k)

        monkeypatch.setattr(MilvusClient, "insert", flaky)
    with pytest.raises(D.ReleaseError) as err:
        release(setup, "staging", "2", cfg=cfg)
    assert err.value.stage == ("deploy_kb" if fault == "milvus_insert" else "deploy_ollama")
    double.blob_delay_s, double.answer = 0.0, OllamaDouble().answer
    assert serving(setup, double, "staging") == before
    assert set(double.models) == models_before  # no half-built release tag
    assert leftovers(setup, double) == ([], [])  # no half-built collection
    assert ReleaseLedger(settings).serving("staging") == (r1.release_id, None)
    failed = ReleaseLedger(settings).events()[-1]
    assert failed.action == "failed" and failed.reason.startswith(err.value.stage)


def test_a_failure_in_the_second_switch_puts_the_first_back(setup, double, monkeypatch):
    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    before = serving(setup, double, "staging")
    real = D.set_env_tags
    calls = []

    def second_half_fails(host, name, env, current, previous, timeout_s=60.0):
        calls.append(current)
        if len(calls) == 1:
            raise RuntimeError("injected: Ollama copy failed")
        return real(host, name, env, current, previous, timeout_s)

    monkeypatch.setattr(D, "set_env_tags", second_half_fails)
    with pytest.raises(D.ReleaseError, match="injected") as err:
        release(setup, "staging", "2")
    assert err.value.stage == "switch"
    assert serving(setup, double, "staging") == before  # the alias moved first and was put back
    assert [e.action for e in ReleaseLedger(settings).events()][-2:] == ["switching", "failed"]
    with open_milvus(cfg.milvus_uri) as c:  # the release that could not switch keeps no collection and no tag
        assert c.list_collections() == [r1.collection]
    assert sorted(m for m in double.models if ":staging" not in m) == [r1.ollama_tag]


CRASH = """
import json, os, sys
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
from deployment import deploy as D
from deployment.modelfile import CHATML_TEMPLATE, ModelfileSpec
from erpops.config import DeployConfig, MLflowSettings
from test_vector_store import DOCS
a = json.loads(sys.argv[1])
D.set_env_tags = lambda *args, **kw: os._exit(9)   # the process dies between the two switches
spec = ModelfileSpec(template=CHATML_TEMPLATE, system="sys", stop=("<|im_end|>",), parameters={{}})
D.release_version(DeployConfig(**a["cfg"]), MLflowSettings(**a["settings"]), "staging", "2", Path(a["gguf"]), spec, DOCS,
                  None, "crash")
"""


def test_a_crash_between_the_two_switches_is_put_back_by_the_next_command(setup, double, tmp_path):
    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    before = serving(setup, double, "staging")
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(repo=str(REPO), tests=str(REPO / "tests")))
    args = {"cfg": cfg.model_dump(mode="json"), "settings": settings.model_dump(mode="json"), "gguf": str(ggufs["2"])}
    proc = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]

    half = serving(setup, double, "staging")
    assert half["collection"] != before["collection"] and half["ollama"] == before["ollama"]  # half-switched
    events = ReleaseLedger(settings).events()
    assert pending_switch(events, "staging") is not None
    crashed = ReleaseLedger(settings).release(events[-1].release_id)

    # the next command in that environment first puts it back, then does its own work
    assert "stopped half-way" in D.reconcile(cfg, settings, D.env_target(cfg, "staging"), "tester")
    assert serving(setup, double, "staging") == before
    assert ReleaseLedger(settings).serving("staging") == (r1.release_id, None)
    third = release(setup, "staging", "3")
    assert crashed.collection in third.collected["collections_dropped"]  # the crashed build is collected
    assert any(crashed.ollama_tag in t for t in third.collected["ollama_tags_deleted"])


def test_retention_keeps_the_newest_and_every_env_current_and_previous(setup, double):
    cfg, settings, _, _ = setup
    cfg = cfg.model_copy(update={"keep_releases": 2})
    first = release(setup, "staging", "1", cfg=cfg).release
    D.promote_env(cfg, settings, "staging", "prod", "kim", "ok")
    made = [release(setup, "staging", v, cfg=cfg).release for v in ("2", "3", "4")]
    with open_milvus(cfg.milvus_uri) as c:
        left = set(c.list_collections())
    # r1: prod's current; r3, r4: the newest two (r3 is also staging's previous); r2: gone, with its Ollama tag
    assert left == {first.collection, made[1].collection, made[2].collection}
    assert made[0].ollama_tag not in double.models and first.ollama_tag in double.models


def test_env_stack_is_a_pure_replay():
    def e(action, rid, env="prod"):
        return ReleaseEvent("t", "m", env, action, rid, None, "a")

    events = [e("switching", "a"), e("deploy", "a"), e("deploy", "b"), e("failed", "c"), e("deploy", "c", "dev"),
              e("promote-env", "d"), e("rollback", "b")]
    assert env_stack(events, "prod") == ["a", "b"] and env_stack(events, "dev") == ["c"]
    assert pending_switch(events, "prod") is None and pending_switch([*events, e("switching", "x")], "prod").release_id == "x"


def test_unknown_environment_is_a_clear_error(setup):
    cfg, *_ = setup
    with pytest.raises(ValueError, match="unknown environment 'qa'; configured: dev, staging, prod"):
        D.env_target(cfg, "qa")
    with pytest.raises(ValueError, match="release_env"):
        DeployConfig(release_env="qa")
    with pytest.raises(ValueError, match="lower-case"):
        DeployConfig(environments={"Prod-1": {}}, release_env="Prod-1")


def test_releases_table_lists_each_env(setup, double):
    from deployment.releases import format_releases

    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    text = format_releases(ReleaseLedger(settings).releases(), ReleaseLedger(settings).events(), list(cfg.environments))
    assert f"staging      {r1.release_id}" in text and "prod         -" in text and "deploy" in text
    assert isinstance(Path(ReleaseLedger(settings).path), Path)


def _repack(src: Path, dest: Path, edit) -> Path:
    import tarfile

    work = dest.parent / (dest.name + ".d")
    with tarfile.open(src, "r:gz") as tar:
        tar.extractall(work, filter="data")
    edit(work)
    with tarfile.open(dest, "w:gz") as tar:
        for p in sorted(work.iterdir()):
            tar.add(p, arcname=p.name)
    return dest


def test_a_bundle_carries_a_release_into_another_store_and_a_corrupted_byte_is_refused(setup, double, tmp_path):
    from deployment.bundle import BundleError, export_bundle
    from erpops.config import MLflowSettings

    cfg, settings, ggufs, _ = setup
    r1 = release(setup, "staging", "1").release
    bundle = export_bundle(r1, ggufs["1"], SPEC, cfg.milvus_uri, tmp_path / "out" / "r1.tar.gz")

    # a closed network: its own ledger, Milvus file and Ollama; no registry entry for the version
    site = tmp_path / "site"
    site_settings = MLflowSettings(tracking_uri=f"sqlite:///{site}/mlflow.db", artifact_location=str(site / "art"))
    with OllamaDouble() as site_ollama:
        site_cfg = cfg.model_copy(update={"milvus_uri": str(site / "kb.db"), "ollama_host": site_ollama.url})

        def corrupt(work: Path):
            data = bytearray((work / "model.gguf").read_bytes())
            data[len(data) // 2] ^= 0x01
            (work / "model.gguf").write_bytes(bytes(data))

        bad = _repack(bundle, tmp_path / "bad.tar.gz", corrupt)
        with pytest.raises(BundleError, match=r"model\.gguf does not match its sha256"):
            D.import_release(site_cfg, site_settings, "prod", bad, "ops", "CAB-1")

        def no_sizes(work: Path):  # a manifest damaged by hand: its files' entries lost their sizes
            manifest = json.loads((work / "manifest.json").read_text())
            for entry in manifest["files"].values():
                del entry["bytes"]
            (work / "manifest.json").write_text(json.dumps(manifest))

        damaged = _repack(bundle, tmp_path / "damaged.tar.gz", no_sizes)
        with pytest.raises(BundleError, match=r"manifest\.json is missing or damaged \(KeyError: 'bytes'\)"):
            D.import_release(site_cfg, site_settings, "prod", damaged, "ops", "CAB-1")
        assert site_ollama.models == {} and site_ollama.blobs == {}  # refused before anything was written
        assert not (site / "kb.db").exists() and ReleaseLedger(site_settings).events() == []

        out = D.import_release(site_cfg, site_settings, "prod", bundle, "ops", "CAB-1")
        assert out.release.release_id == r1.release_id and out.release.gguf_sha256 == r1.gguf_sha256
        with open_milvus(site_cfg.milvus_uri) as c:
            assert alias_target(c, "erp_kb_prod") == r1.collection
            imported = int(c.get_collection_stats(r1.collection)["row_count"])
        with open_milvus(cfg.milvus_uri) as c:
            assert imported == int(c.get_collection_stats(r1.collection)["row_count"]) > 0
        assert site_ollama.model(f"{NAME}:prod")["digest"] == site_ollama.model(r1.ollama_tag)["digest"]
        assert set(site_ollama.blobs) == {f"sha256:{r1.gguf_sha256}"}
        assert ReleaseLedger(site_settings).serving("prod") == (r1.release_id, None)
        assert ReleaseLedger(site_settings).events()[-1].reason == "bundle r1.tar.gz: CAB-1"


def test_cli_promote_env_needs_a_reason_and_releases_shows_both_envs(setup, double, tmp_path):
    cfg, settings, _, _ = setup
    r1 = release(setup, "staging", "1").release
    cli = erpops_cli(tmp_path, cfg, settings, double.url)

    refused = cli("promote-env", "staging", "prod")
    assert refused.returncode == 2 and "needs --reason" in refused.stderr and "Traceback" not in refused.stderr
    ok = cli("promote-env", "staging", "prod", "--reason", "CAB-7")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["release"] == r1.release_id
    listed = cli("releases", "--json")
    state = json.loads(listed.stdout)["environments"]
    assert state["staging"]["stack"] == state["prod"]["stack"] == [r1.release_id] and state["dev"]["stack"] == []
    table = cli("releases").stdout
    assert "promote-env" in table and "approved by" in table
    unknown = cli("rollback", "--env", "qa")
    assert unknown.returncode == 2 and "unknown environment 'qa'" in unknown.stderr
