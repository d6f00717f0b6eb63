"""Content-keyed step caching: keys from content (not run ids), stale records not reused, the pure no-change rule."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from erpops.stage_cache import ContentKey, artefacts_exist, code_version, digest_json, digest_paths, paths_in, stage_key
from registry.promote import no_change


@dataclass
class Made:
    path: Path
    value: int


CALLS = []


def make(text: str, out: Path) -> Made:
    CALLS.append(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return Made(out, len(text))


def test_digest_json_ignores_key_order_and_digest_paths_sees_content(tmp_path):
    assert digest_json({"a": 1, "b": [1, 2]}) == digest_json({"b": [1, 2], "a": 1})
    assert digest_json({"a": 1}) != digest_json({"a": 2})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("one")
    first = digest_paths([tmp_path / "d"])
    (tmp_path / "d" / "x.txt").write_text("two")
    assert digest_paths([tmp_path / "d"]) != first
    assert digest_paths([tmp_path / "missing"]) != digest_paths([tmp_path / "d"])


def test_stage_key_depends_on_stage_parts_and_code():
    k = stage_key("train", {"lr": 1}, ("training",))
    assert k == stage_key("train", {"lr": 1}, ("training",))
    assert k != stage_key("train", {"lr": 2}, ("training",))
    assert k != stage_key("optimize", {"lr": 1}, ("training",))
    assert code_version(("training",)) != code_version(("registry",))


def test_train_and_optimize_keys_see_base_weights_rewritten_under_the_same_path(tmp_path):
    """`model.source: path` names a folder; new weights written there must train again, not come from the cache."""
    import os

    from erpops.config import Recipe
    from flows.steps import _optimize_parts, _train_parts

    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"w" * 8)
    (base / "sub" / "notes.txt").write_text("not weights")
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "path", "path": str(base)}})
    train = {"recipe": recipe, "base": base, "train_examples": [], "runtime": {}}
    optimize = {"cfg": recipe.optimize, "base": base, "adapter_dir": tmp_path / "adapter", "eval_examples": [],
                "runtime": {}}
    keys = lambda: (digest_json(_train_parts(train)), digest_json(_optimize_parts(optimize)))  # noqa: E731
    before = keys()
    assert keys() == before
    (base / "sub" / "notes.txt").write_text("still not weights")
    assert keys() == before
    st = (base / "model.safetensors").stat()
    (base / "model.safetensors").write_bytes(b"v" * 8)  # the same size, rewritten
    os.utime(base / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]
    (base / "config.json").write_text('{"a": 1}')
    assert keys()[0] != after[0]
    after = keys()
    (base / "chat_template.jinja").write_text("{{ messages }}")  # a new chat template: both stages again
    assert keys()[0] != after[0] and keys()[1] != after[1]
    after = keys()
    (base / "README.md").write_text("a model card")  # not read by the stages
    assert keys() == after
    hub = {**train, "base": "HuggingFaceTB/SmolLM2-1.7B-Instruct"}
    assert _train_parts(hub)["weights"] == [] and _train_parts(hub)["files"] == []


def test_every_tiny_model_field_gets_its_own_folder():
    from erpops.config import TinyModelConfig
    from training.base_model import tiny_folder_name

    default = TinyModelConfig()
    names = {tiny_folder_name(default)}
    for field, value in default.model_dump().items():
        names.add(tiny_folder_name(default.model_copy(update={field: value + 1})))
    assert len(names) == 1 + len(TinyModelConfig.model_fields)


def test_paths_in_finds_nested_paths(tmp_path):
    made = {"a": [Made(tmp_path / "x", 1)], "b": (tmp_path / "y",)}
    assert set(paths_in(made)) == {tmp_path / "x", tmp_path / "y"}
    assert not artefacts_exist(made)


def test_no_change_only_when_the_candidate_is_the_champions_gguf():
    assert no_change("abc", "3", {"gguf_sha256": "abc"}).startswith("the candidate is champion v3")
    assert no_change("abc", "3", {"gguf_sha256": "def"}) is None
    assert no_change("abc", None, {}) is None


@pytest.mark.integration
def test_cached_across_flow_runs_rerun_on_change_or_missing_artefact(prefect_harness, tmp_path):
    from prefect import flow

    policy = ContentKey(stage="make", parts=lambda i: {"text": i["text"]}, packages=("erpops",))
    make_task = policy.task(make)

    @flow
    def run(text: str, out: str):
        state = make_task.with_options(result_storage=tmp_path / "cache")(text, Path(out), return_state=True)
        return state.name, state.result().path

    CALLS.clear()
    assert run("hello", str(tmp_path / "run1" / "x.txt"))[0] == "Completed"
    name, path = run("hello", str(tmp_path / "run2" / "x.txt"))  # another run, same content: stored result
    assert name == "Cached" and path == tmp_path / "run1" / "x.txt" and CALLS == ["hello"]
    assert run("changed", str(tmp_path / "run3" / "x.txt"))[0] == "Completed"
    (tmp_path / "run1" / "x.txt").unlink()  # the cached result's file is gone: the stage runs again
    name, path = run("hello", str(tmp_path / "run4" / "x.txt"))
    assert name == "Completed" and path.exists() and CALLS == ["hello", "changed", "hello"]
    assert run("hello", str(tmp_path / "run5" / "x.txt")) == ("Cached", tmp_path / "run4" / "x.txt")
