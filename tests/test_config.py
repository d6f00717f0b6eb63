from pathlib import Path

import pytest

from erpops.config import ConfigError, Recipe, load_mlflow_settings, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES} >= {"smollm2-135m/cpu.yaml", "tiny/test.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_recipe_loads_and_says_how_to_run_it(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    head = path.read_text(encoding="utf-8").splitlines()[:4]
    assert any(line.startswith("# Run: erpops run --recipe " + path.relative_to(REPO).as_posix()) for line in head)


def test_every_field_has_a_docstring():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)
    walk(Recipe)


def test_bad_recipe_reports_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {max_steps: 0, batch_size: -1}\nlora: {rank: 8}\noptimize: {ship: q4}\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert str(bad) in msg
    for where in ("train.max_steps", "train.batch_size", "lora.rank", "optimize.ship"):
        assert where in msg


def test_missing_and_non_mapping_recipes_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "cp949.yaml").write_bytes("name: 재고\n".encode("cp949"))  # saved by an editor in the Korean code page
    with pytest.raises(ConfigError, match=r"cp949\.yaml: not UTF-8 text"):
        load_recipe(tmp_path / "cp949.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="folder.yaml"):
        load_recipe(tmp_path / "folder.yaml")


def test_recipe_digest_ignores_layout_but_not_values(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("name: r\ntrain: {max_steps: 5, batch_size: 2}\n")
    b.write_text("# comment\ntrain:\n  batch_size: 2\n  max_steps: 5\nname: r\n")
    assert load_recipe(a).digest() == load_recipe(b).digest()
    assert load_recipe(a).digest() != load_recipe(a, {"train.max_steps": 6}).digest()


def test_mlflow_settings_resolve_relative_paths_and_env_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "mlflow.yaml"
    cfg.write_text("tracking_uri: sqlite:///store/m.db\nartifact_location: arts\nregistered_model_name: m1\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ERPOPS_REGISTERED_MODEL", raising=False)
    s = load_mlflow_settings(cfg)
    assert s.tracking_uri == f"sqlite:///{tmp_path}/store/m.db"
    assert s.artifact_location == str(tmp_path / "arts")
    assert s.registered_model_name == "m1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    monkeypatch.setenv("ERPOPS_REGISTERED_MODEL", "m2")
    s = load_mlflow_settings(cfg)
    assert s.tracking_uri == "sqlite:////elsewhere/x.db" and s.registered_model_name == "m2"


def test_heavy_commands_start_over_under_jemalloc_where_it_exists(tmp_path):
    from erpops.runtime import jemalloc_env

    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    found = (str(lib),)
    env = jemalloc_env(["erpops", "run", "--recipe", "r.yaml"], {"PATH": "/bin"}, found)
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(lib), "MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"}
    kept = jemalloc_env(["erpops", "train"], {"LD_PRELOAD": "/opt/libfoo.so", "MALLOC_CONF": "narenas:2"}, found)
    assert kept["LD_PRELOAD"] == f"{lib} /opt/libfoo.so"  # an earlier preload is kept
    assert kept["MALLOC_CONF"] == "narenas:2"  # and a jemalloc configuration already set
    assert jemalloc_env(["erpops", "status"], {}, found) is None  # light commands: as they are
    assert jemalloc_env(["erpops"], {}, found) is None
    assert jemalloc_env(["erpops", "run"], {"LD_PRELOAD": str(lib)}, found) is None  # never twice
    assert jemalloc_env(["erpops", "run"], {"ERPOPS_JEMALLOC": "0"}, found) is None  # turned off
    assert jemalloc_env(["erpops", "run"], {}, (str(tmp_path / "absent.so"),)) is None  # no jemalloc here


def test_the_preload_loads_jemalloc_and_the_console_script_still_answers():
    """Where the system has jemalloc, a process started with jemalloc_env's environment has it mapped (where
    it has none, nothing changes); `erpops evaluate --help` answers through the re-exec."""
    import os
    import subprocess
    import sys

    from erpops.runtime import jemalloc_env

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ERPOPS_JEMALLOC")}
    preload = jemalloc_env(["erpops", "run"], env)
    probe = subprocess.run([sys.executable, "-c", "print('jemalloc' in open('/proc/self/maps').read())"],
                           env=preload or env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str(preload is not None), probe.stderr
    erpops = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "erpops"
    if not erpops.exists():
        pytest.skip("no .venv/bin/erpops (make install)")
    out = subprocess.run([str(erpops), "evaluate", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--recipe" in out.stdout and "Usage: erpops evaluate" in out.stdout, out.stderr[-2000:]


def test_an_mlflow_config_named_but_missing_is_an_error_and_the_default_stays_optional(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ERPOPS_MLFLOW_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="typo-mlflow.yaml: file not found"):
        load_mlflow_settings(tmp_path / "typo-mlflow.yaml")
    monkeypatch.setenv("ERPOPS_MLFLOW_CONFIG", str(tmp_path / "also-missing.yaml"))
    with pytest.raises(ConfigError, match="also-missing.yaml: file not found"):
        load_mlflow_settings()
    monkeypatch.delenv("ERPOPS_MLFLOW_CONFIG")
    monkeypatch.chdir(tmp_path)  # no ./mlflow.yaml here: the defaults, resolved against this folder
    assert load_mlflow_settings().tracking_uri == f"sqlite:///{tmp_path}/.erpops/mlflow.db"


def test_an_override_fills_an_empty_section_and_refuses_a_scalar_one(tmp_path):
    empty = tmp_path / "r.yaml"
    empty.write_text("name: x\ndata:\n")
    assert load_recipe(empty, {"data.root": str(tmp_path / "d")}).data.root == tmp_path / "d"
    scalar = tmp_path / "s.yaml"
    scalar.write_text("name: x\ndata: 5\n")
    with pytest.raises(ConfigError, match="cannot set data.root: data is a int"):
        load_recipe(scalar, {"data.root": "d"})


def test_a_recipe_s_gguf_agreement_floors_keep_the_defaults_it_does_not_name():
    """A recipe that lowers q8_0's floor must not leave the f16 fallback checked against 0."""
    from erpops.config import OptimizeConfig

    assert OptimizeConfig(min_agreement={"q8_0": 0.9}).min_agreement == {"f16": 0.99, "q8_0": 0.9}
    with pytest.raises(ValueError, match="between 0 and 1"):
        OptimizeConfig(min_agreement={"f16": 1.5})
    with pytest.raises(ValueError):
        OptimizeConfig(min_agreement={"q4_k": 0.9})  # no such export
