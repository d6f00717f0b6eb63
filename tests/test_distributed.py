"""Data-parallel training (accelerate launch, gloo on CPU) and gradient checkpointing on the tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from erpops.config import Recipe
from erpops.device import Runtime

TINY = {"name": "t", "model": {"source": "tiny"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 6, "batch_size": 6, "learning_rate": 1e-2, "warmup_steps": 1, "precision": "fp32",
                  "checkpoint_every": 3}}


def _examples(corpus, tmp_path):
    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data

    return read_examples(validate_data(data_cfg(corpus), tmp_path / "data").train_path)


@pytest.mark.integration
def test_two_processes_take_the_same_steps_as_one(tiny_model_dir, corpus, tmp_path, mlflow_settings):
    """batch_size is the global batch and the loss is normalised by the global token count, so two
    processes (each with half of every batch) must follow the single-process loss curve."""
    from safetensors.torch import load_file

    from erpops.tracking import Tracker
    from training.launch import train
    from training.lora import train_lora

    examples = _examples(corpus, tmp_path)
    runtime = Runtime("cpu", "float32")
    one = train_lora(Recipe.model_validate(TINY), tiny_model_dir, examples, tmp_path / "one", runtime)

    tracker = Tracker.start(mlflow_settings, "ddp")
    two_recipe = Recipe.model_validate({**TINY, "train": {**TINY["train"], "num_processes": 2}})
    two = train(two_recipe, tiny_model_dir, examples, tmp_path / "two", runtime, tracker)
    tracker.end()

    assert two.steps == one.steps == 6
    assert abs(two.first_loss - one.first_loss) < 1e-5
    assert abs(two.final_loss - one.final_loss) < 1e-4
    a = load_file(one.adapter_dir / "adapter_model.safetensors")
    b = load_file(two.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # each process kept its own RNG state in the checkpoint
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step-3").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    # only rank 0 logged, into the caller's run
    history = tracker.client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in history] == list(range(6))
    assert tracker.client.get_run(tracker.run_id).data.params["train.processes"] == "2"


@pytest.mark.integration
def test_accelerate_launch_of_erpops_train(corpus, tmp_path):
    """The documented command: `accelerate launch ... -m erpops.cli train` trains in place (rank 0 validates,
    logs and writes the adapter) instead of starting a launch of its own."""
    from conftest import REPO

    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "tiny" / "test.yaml").read_text()
                      .replace("root: data/erp", f"root: {corpus}").replace("max_steps: 8", "max_steps: 3"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "erpops.cli", "train", "--recipe", str(recipe), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])  # printed once, by rank 0
    assert out["processes"] == 2 and out["final_loss"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert proc.stdout.count('"run_dir"') == 1


def test_gradient_checkpointing_changes_memory_not_the_loss(tiny_model_dir, corpus, tmp_path):
    from training.lora import train_lora

    examples = _examples(corpus, tmp_path)
    runtime = Runtime("cpu", "float32")
    short = {**TINY, "train": {**TINY["train"], "max_steps": 3, "checkpoint_every": 0}}
    plain = train_lora(Recipe.model_validate(short), tiny_model_dir, examples, tmp_path / "a", runtime)
    ckpt = Recipe.model_validate({**short, "train": {**short["train"], "gradient_checkpointing": True}})
    recomputed = train_lora(ckpt, tiny_model_dir, examples, tmp_path / "b", runtime)
    assert abs(plain.first_loss - recomputed.first_loss) < 1e-6
    assert abs(plain.final_loss - recomputed.final_loss) < 1e-5


def test_a_global_batch_smaller_than_the_process_count_is_refused(tiny_model_dir):
    from erpops.distributed import Dist
    from training.lora import train_lora

    recipe = Recipe.model_validate({**TINY, "train": {**TINY["train"], "batch_size": 1}})
    with pytest.raises(ValueError, match="global batch"):
        train_lora(recipe, tiny_model_dir, [], tiny_model_dir, Runtime("cpu", "float32"), dist=Dist(0, 2, 0))


def test_shard_splits_a_batch_without_loss_or_overlap():
    from erpops.distributed import Dist, shard

    batch = list(range(7))
    parts = [shard(Dist(r, 3, r), batch) for r in range(3)]
    assert sorted(x for p in parts for x in p) == batch and all(parts)
