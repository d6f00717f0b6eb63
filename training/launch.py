"""The train stage's entry point: in this process, or data-parallel under `accelerate launch`.

    erpops train --recipe recipes/smollm2-1.7b/gpu.yaml        # train.num_processes: 4 -> 4 processes

With `train.num_processes` above 1 the stage starts

    accelerate launch --multi_gpu --num_processes N -m training.launch <request.json>

and waits: every process trains its share of each global batch (`training.lora`, `erpops.distributed`),
rank 0 logs into the caller's MLflow run and writes the adapter, and the caller reads the result back.
`--multi_gpu` is accelerate's name for its torch.distributed launcher; on a machine without GPUs the
processes use gloo on CPU, which is how CI tests this path.

Already inside a launch (`accelerate launch -m erpops.cli train ...` or `torchrun`), `erpops train` trains
in place instead of starting another one.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from erpops import distributed
from erpops.config import Recipe
from erpops.device import Runtime
from erpops.tracking import Tracker
from training.lora import TrainResult, train_lora

log = logging.getLogger(__name__)


def train(recipe: Recipe, base: Path | str, train_examples: list[dict], out_dir: Path, runtime: Runtime,
          tracker: Tracker | None = None, resume: bool = False) -> TrainResult:
    """Train LoRA adapters with as many processes as the recipe asks for (see `training.lora.train_lora`)."""
    n = recipe.train.num_processes
    if n <= 1 or distributed.from_env().enabled:
        return train_lora(recipe, base, train_examples, out_dir, runtime, tracker, resume=resume,
                          dist=distributed.from_env())
    return launch(recipe, base, train_examples, out_dir, runtime, tracker, resume, n)


def launch(recipe: Recipe, base: Path | str, train_examples: list[dict], out_dir: Path, runtime: Runtime,
           tracker: Tracker | None, resume: bool, num_processes: int) -> TrainResult:
    """Run `train_lora` in `num_processes` processes under `accelerate launch`; returns rank 0's result."""
    work = out_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in train_examples),
                                      encoding="utf-8")
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    request = {"recipe": recipe.model_dump(mode="json"), "base": str(base), "train": str(work / "train.jsonl"),
               "out_dir": str(out_dir), "runtime": asdict(runtime), "resume": resume, "result": str(result_path),
               "run_id": tracker.run_id if tracker else None,
               "tracking_uri": tracker.tracking_uri if tracker else None}
    (work / "request.json").write_text(json.dumps(request, ensure_ascii=False, indent=2), encoding="utf-8")
    if tracker:
        tracker.flush()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "training.launch", str(work / "request.json")]
    log.info("training with %d processes: %s", num_processes, " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}); its processes' output is above, "
                           f"the request in {work / 'request.json'}")
    data = json.loads(result_path.read_text())
    return TrainResult(**{**data, "adapter_dir": Path(data["adapter_dir"])})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(request_path: str) -> None:
    """One process of a launch: join the group, train, and (rank 0) write the result file."""
    from data_contracts.dataset import read_examples
    from erpops.runtime import configure_logging, setup_process

    setup_process()
    configure_logging()
    req = json.loads(Path(request_path).read_text(encoding="utf-8"))
    runtime = Runtime(**req["runtime"])
    dist = distributed.init(runtime.device)
    try:
        tracker = Tracker(req["run_id"], req["tracking_uri"]) if dist.is_main and req["run_id"] else None
        result = train_lora(Recipe.model_validate(req["recipe"]), req["base"], read_examples(Path(req["train"])),
                            Path(req["out_dir"]), runtime, tracker, resume=req["resume"], dist=dist)
        if tracker:
            tracker.flush()
        if dist.is_main:
            Path(req["result"]).write_text(json.dumps({**asdict(result), "adapter_dir": str(result.adapter_dir)}))
    finally:
        distributed.close(dist)


if __name__ == "__main__":
    main(sys.argv[1])
