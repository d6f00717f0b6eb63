"""A thin, explicit handle on one MLflow run: stages get a Tracker instead of relying on a global run.

Metrics are buffered and sent with `log_batch` (one HTTP call per flush, not one per value).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from erpops.config import MLflowSettings


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The MLflow UI opens the experiment with its model-training views (runs, metrics, models), not the GenAI ones."""


def configure_mlflow(settings: MLflowSettings) -> str:
    """Point MLflow at the configured store and return the experiment id (creating it if needed)."""
    import mlflow

    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is None:
        exp_id = client.create_experiment(settings.experiment_name, artifact_location=_as_uri(settings.artifact_location),
                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made before the tag, or by hand: set, never overwrite
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id


def _as_uri(location: str) -> str:
    return location if "://" in location else Path(location).resolve().as_uri()


class Tracker:
    """Logs to one MLflow run by id; safe to pass between Prefect tasks and processes."""

    def __init__(self, run_id: str, tracking_uri: str):
        import mlflow

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._pending: list[Any] = []

    @classmethod
    def start(cls, settings: MLflowSettings, run_name: str, tags: dict[str, str] | None = None) -> "Tracker":
        import mlflow

        exp_id = configure_mlflow(settings)
        run = mlflow.MlflowClient().create_run(exp_id, run_name=run_name, tags=tags or {})
        return cls(run.info.run_id, settings.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        self._pending.append(Metric(key, float(value), int(time.time() * 1000), step))
        if len(self._pending) >= 500:
            self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        for k, v in metrics.items():
            self.log_metric(k, v, step)
        self.flush()

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict | list, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_input(self, name: str, digest: str, rows: list[dict], source: str, context: str) -> None:
        """An MLflow dataset input whose digest is our content digest (not MLflow's own hash)."""
        import mlflow
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        df = pd.DataFrame([{"id": r["id"], "module": r["module"], "lang": r["lang"], "source": r["source"],
                            "messages": json.dumps(r["messages"], ensure_ascii=False)} for r in rows])
        # MLflow keeps 36 characters of a digest; the full sha256 is a run tag (dataset.digest).
        with warnings.catch_warnings():  # a local path matches two equivalent source types; MLflow warns
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36])
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)])

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=path.parent, suffix=".tmp")[1])
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    return path
