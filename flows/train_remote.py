"""The train stage as its own flow, for a deployment on another work pool (a GPU machine). Wiring only.

    # prefect.yaml: train-remote/train-gpu on the erpops-gpu pool; on the GPU machine:
    prefect worker start --pool erpops-gpu
    # in the recipe:  train: {deployment: train-remote/train-gpu}

The caller (train-and-gate) logs the training split into its MLflow run and passes the run id; this flow
reads the split from there, trains on this machine's device, logs its metrics and the adapter into the same
run and writes `train/result.json` there. Nothing travels but the run id: the two machines share the
MLflow tracking server, not a file system.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import flow

from data_contracts.dataset import read_examples
from erpops.config import Recipe
from erpops.device import resolve_runtime
from erpops.runtime import setup_process
from erpops.tracking import Tracker
from training.base_model import MODELS_DIR, resolve_base_model
from training.launch import train

TRAIN_SPLIT_ARTIFACT = "data/train.jsonl"
RESULT_ARTIFACT = "train/result.json"


@flow(name="train-remote", log_prints=True)
def train_remote(recipe: dict, mlflow_run_id: str, tracking_uri: str) -> dict:
    """Train LoRA for `recipe` (a resolved recipe, as a dict) into MLflow run `mlflow_run_id`; returns the result.

    The split, checkpoints and adapter live in a temporary folder removed when the flow ends, done or not: what the
    caller needs is in the MLflow run by then (its paths in the result name files that no longer exist)."""
    import mlflow

    setup_process()
    r = Recipe.model_validate(recipe)
    work = Path(tempfile.mkdtemp(prefix="train-remote-"))
    try:
        mlflow.set_tracking_uri(tracking_uri)
        split = Path(mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path=TRAIN_SPLIT_ARTIFACT,
                                                         dst_path=str(work)))
        tracker = Tracker(mlflow_run_id, tracking_uri)
        result = train(r, resolve_base_model(r.model, MODELS_DIR), read_examples(split), work,
                       resolve_runtime(r.train.precision), tracker)
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
        tracker.log_dict(out, RESULT_ARTIFACT)
        tracker.flush()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
