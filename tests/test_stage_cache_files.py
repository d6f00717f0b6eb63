"""A cached result is reused only while the files it names hold what they held when it was stored, and a check
that cannot decide forgets nothing."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from erpops.stage_cache import ContentKey

CALLS: list[str] = []


@dataclass
class Made:
    path: Path


def make(text: str, out: Path) -> Made:
    CALLS.append(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return Made(out)


@pytest.mark.integration
def test_a_result_whose_file_was_overwritten_is_not_reused(prefect_harness, tmp_path):
    from prefect import flow

    make_task = ContentKey(stage="make", parts=lambda i: {"text": i["text"]}).task(make)

    @flow
    def run(text: str, out: str):
        state = make_task.with_options(result_storage=tmp_path / "cache")(text, Path(out), return_state=True)
        return state.name, state.result().path

    CALLS.clear()
    shared = tmp_path / "nightly" / "x.txt"
    assert run("original", str(shared))[0] == "Completed"
    assert run("cut", str(shared))[0] == "Completed"  # same run folder: the first result's file now holds "cut"
    name, path = run("original", str(tmp_path / "other" / "x.txt"))
    assert name == "Completed" and path.read_text() == "original" and CALLS == ["original", "cut", "original"]
    assert run("original", str(tmp_path / "third" / "x.txt")) == ("Cached", tmp_path / "other" / "x.txt")


@pytest.mark.integration
def test_an_undecided_check_neither_reuses_nor_forgets(prefect_harness, tmp_path):
    from prefect import flow

    answer: list[object] = [True]

    def valid(result: Made) -> bool:
        if isinstance(answer[0], Exception):
            raise answer[0]
        return bool(answer[0])

    make_task = ContentKey(stage="make", parts=lambda i: {"text": i["text"]}, valid=valid).task(make)

    @flow
    def run(out: str):
        state = make_task.with_options(result_storage=tmp_path / "cache")("same", Path(out), return_state=True)
        return state.name, state.result().path

    CALLS.clear()
    first = tmp_path / "r1" / "x.txt"
    assert run(str(first)) == ("Completed", first)
    answer[0] = ConnectionError("registry down")
    assert run(str(tmp_path / "r2" / "x.txt"))[0] == "Completed"  # not reused while the check cannot tell
    answer[0] = True
    assert run(str(tmp_path / "r3" / "x.txt")) == ("Cached", first)  # the record was not forgotten
    answer[0] = False
    assert run(str(tmp_path / "r4" / "x.txt"))[0] == "Completed"  # a definite "gone" moves on
    assert CALLS == ["same", "same", "same"]


def test_only_a_missing_version_counts_as_gone(monkeypatch, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from erpops.config import MLflowSettings
    from registry.promote import version_exists

    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    errors = {"missing": MlflowException("no such version", error_code=RESOURCE_DOES_NOT_EXIST),
              "down": MlflowException("database is locked", error_code=INTERNAL_ERROR)}

    def get_model_version(self, name, version):
        raise errors[version]

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    assert version_exists(settings, "1") is False  # a real store without the registered model
    client.create_registered_model(settings.registered_model_name)
    assert version_exists(settings, "1") is False  # with it, without the version
    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version", get_model_version)
    assert version_exists(settings, "missing") is False
    with pytest.raises(MlflowException, match="locked"):
        version_exists(settings, "down")


def test_a_promotion_the_registry_refused_is_never_reused(tmp_path):
    """The gate passed but the champion had moved since: the champion may be back by the next run, and the pass
    must then be acted on, not read back from the cache."""
    import mlflow

    from erpops.config import MLflowSettings
    from flows.steps import Promoted
    from registry.promote import AliasPlan

    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.create_registered_model(settings.registered_model_name)
    version = client.create_model_version(settings.registered_model_name, source=str(tmp_path)).version
    kept = Promoted(version, AliasPlan({"candidate": version}), settings)
    refused = Promoted(version, AliasPlan({"candidate": version}, skipped="the champion is now v6"), settings)
    assert kept.still_stands() and not refused.still_stands()
