"""The whole pipeline, as `erpops run` starts it: the train-and-gate flow, then the release flow (to the recipe's
deploy.release_env, staging by default) when the champion moved. Wiring only; train-and-gate never calls release
itself: on a Prefect server its promotion event triggers the release-staging deployment (prefect.yaml), and this
flow is the zero-setup path that does the same in one process.

    erpops run --recipe recipes/smollm2-135m/cpu.yaml
    python -m flows.pipeline recipes/smollm2-135m/cpu.yaml
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow
from prefect.states import Failed

from erpops.config import load_recipe
from erpops.orchestration import publish_summary
from erpops.summary import RunSummary
from flows.release import release
from flows.train_and_gate import train_and_gate


def set_aside_summary(path: Path) -> Path | None:
    """Rename an earlier run's summary at `path` (a rerun under the same run name) to `run_summary.previous.json`,
    so that a run which stops before writing its own is never reported with the earlier one's stages and verdict.
    Returns the new path, or None when there was none."""
    if not path.is_file():
        return None
    return path.replace(path.with_name("run_summary.previous.json"))


@flow(name="erpops-pipeline", log_prints=True)
def pipeline(recipe_path: str = "recipes/smollm2-135m/cpu.yaml", mlflow_config: str | None = None,
             run_name: str | None = None, reason: str = ""):
    """train-and-gate, then release of the new champion (its promotion undone if serving cannot follow).

    Returns the run summary (a dict); when a stage failed, a Failed state whose message names the stage,
    the reason and the summary file."""
    recipe = load_recipe(recipe_path)
    run_name = run_name or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = recipe.output_root / run_name / "run_summary.json"
    set_aside_summary(path)
    state = train_and_gate(recipe_path, mlflow_config, run_name, reason, return_state=True)
    if state.is_completed() and state.result()["outputs"].get("promoted"):
        summary = state.result()
        promote = next(s for s in summary["stages"] if s["name"] == "promote")["outputs"]
        state = release(recipe_path, mlflow_config, version=summary["outputs"]["model_version"], run_name=run_name,
                        restore={"set": promote["aliases_set"], "delete": promote["aliases_deleted"],
                                 "before": promote["aliases_before"]}, return_state=True)
    if path.is_file():  # the merged summary of both flows, on this run too (what `erpops trigger` reads)
        publish_summary(RunSummary.read(path).to_dict())
    if not state.is_completed():
        return Failed(message=state.message)
    return state.result()


if __name__ == "__main__":
    state = pipeline(sys.argv[1] if len(sys.argv) > 1 else "recipes/smollm2-135m/cpu.yaml", return_state=True)
    sys.exit(0 if state.is_completed() else 1)
