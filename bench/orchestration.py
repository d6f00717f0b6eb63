"""Benchmark: what orchestration costs. `erpops run` (a fresh process: imports, Prefect's temporary server, two
flows, the cache) against the same stages called as plain functions in one process; then `erpops run` again
with nothing changed (every stage cached: "no change").

    .venv/bin/python bench/orchestration.py                                   # tiny recipe, a few minutes
    .venv/bin/python bench/orchestration.py --recipe recipes/smollm2-135m/cpu.yaml   # the default, ~25 min

Each part gets a fresh MLflow store, run folder, cache and Milvus file, so the first two do the same work:
validate, train, optimize, evaluate (no champion yet), register + promote, the knowledge base, and the
Ollama half (skipped: no server), the switch. The base model is resolved once before timing. Goals (issue 11):
overhead ratio <= 1.10; cached rerun < 30 s on the tiny recipe, < 60 s on the default. Prints a table and,
as its last line, name=value pairs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def isolated(recipe_path: Path, root: Path) -> tuple[Path, Path]:
    """The recipe with its run folders, cache and Milvus file under `root`, and an mlflow.yaml for a store there."""
    root.mkdir(parents=True, exist_ok=True)
    text = recipe_path.read_text()
    for key, value in (("output_root", root / "runs"), ("milvus_uri", root / "milvus.db")):
        lines = [ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:")]
        assert lines, f"{recipe_path} has no {key}"
        indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
        text = text.replace(lines[0], f"{indent}{key}: {value}")
    text = text.replace("root: data/erp", f"root: {REPO / 'data' / 'erp'}")
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    mlflow_yaml = root / "mlflow.yaml"
    mlflow_yaml.write_text(f"tracking_uri: sqlite:///{root}/mlflow.db\nartifact_location: {root / 'artifacts'}\n")
    return recipe, mlflow_yaml


def bare(recipe_path: Path, mlflow_yaml: Path) -> dict[str, float]:
    """The stages as plain functions, in order, timed one by one (what the flows wrap)."""
    from data_contracts.dataset import read_examples
    from deployment.deploy import registered_bundle, release_version
    from erpops.config import load_mlflow_settings, load_recipe
    from erpops.device import resolve_runtime
    from erpops.tracking import Tracker
    from evaluation.evaluate import evaluate_candidate
    from evaluation.retrieval import read_golden
    from flows.steps import promote_step, validate_step
    from registry.champion import fetch_champion
    from training.base_model import MODELS_DIR, resolve_base_model
    from training.launch import train
    from training.optimize import optimize_model

    r, settings = load_recipe(recipe_path), load_mlflow_settings(mlflow_yaml)
    runtime = resolve_runtime(r.train.precision)
    run_dir = r.output_root / "bare"
    times: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        times[name] = time.perf_counter() - t0
        return out

    tracker = Tracker.start(settings, "bare")
    data = timed("validate", validate_step, r.data, r.model, run_dir / "data", tracker)
    train_rows, eval_rows = read_examples(data.train_path), read_examples(data.eval_path)
    base = resolve_base_model(r.model, MODELS_DIR)
    trained = timed("train", train, r, base, train_rows, run_dir, runtime, tracker)
    opt = timed("optimize", optimize_model, r.optimize, base, trained.adapter_dir, eval_rows[: r.gate.max_examples],
                run_dir, runtime, tracker, calibration_examples=train_rows)
    shipped = opt.gguf[opt.shipped]
    champion = fetch_champion(settings, run_dir / "champion")
    result = timed("evaluate", evaluate_candidate, r.gate, shipped.path, eval_rows, champion, run_dir, runtime, tracker,
                   candidate_nll=shipped.example_nll)  # as the flow does
    promoted = timed("promote", promote_step, settings, tracker.run_id, shipped.path, opt.modelfile,
                     {"gguf_sha256": shipped.sha256, "gate_verdict": result.verdict.verdict}, result.verdict.passed, None)
    golden_path = r.data.root / "golden_queries.jsonl"
    t0 = time.perf_counter()
    gguf, spec = registered_bundle(settings.tracking_uri, settings.registered_model_name, promoted.version,
                                   Path(tempfile.mkdtemp()))
    times["bundle"] = time.perf_counter() - t0
    out = release_version(r.deploy, settings, r.deploy.release_env, promoted.version, gguf, spec, data.docs,
                          read_golden(golden_path) if golden_path.is_file() else None, "bench")
    times.update(deploy_kb=out.seconds["kb"], deploy_ollama=out.seconds["ollama"], switch=out.seconds["switch"])
    tracker.end()
    return times


def erpops_run(recipe: Path, mlflow_yaml: Path, run_name: str) -> tuple[float, str]:
    # mlflow.set_tracking_uri (the bare part) exports MLFLOW_TRACKING_URI, which would point the run at the bare store
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OLLAMA_HOST"] = os.environ.get("BENCH_OLLAMA_HOST", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "erpops"), "run", "--recipe", str(recipe), "--mlflow-config",
                           str(mlflow_yaml), "--run-name", run_name], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"erpops run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/tiny/test.yaml")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    os.environ["OLLAMA_HOST"] = "http://127.0.0.1:9"  # no server: the Ollama half is skipped, in both
    from erpops.config import load_recipe
    from erpops.runtime import setup_process
    from training.base_model import MODELS_DIR, resolve_base_model

    setup_process(REPO / ".erpops")
    resolve_base_model(load_recipe(args.recipe).model, MODELS_DIR)  # cached once, outside every timing
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-orch-"))

    stages = bare(*isolated(Path(args.recipe), work / "bare"))
    bare_sum = sum(stages.values())
    recipe, mlflow_yaml = isolated(Path(args.recipe), work / "flow")
    run_wall, _ = erpops_run(recipe, mlflow_yaml, "first")
    cached_wall, out = erpops_run(recipe, mlflow_yaml, "again")
    no_change = "no change" in out

    import json

    in_flow = {st["name"]: st["duration_s"] for st in
               json.loads((work / "flow" / "runs" / "first" / "run_summary.json").read_text())["stages"]}
    print(f"{'part':<28}{'bare s':>10}{'in flow s':>11}")
    for name, s in stages.items():
        print(f"  {name:<26}{s:>10.1f}{in_flow.get(name, float('nan')):>11.1f}")
    print(f"{'stages, sum':<28}{bare_sum:>10.1f}{sum(in_flow.values()):>11.1f}")
    print(f"{'erpops run (new process)':<28}{'':>10}{run_wall:>11.1f}")
    print(f"{'erpops run, nothing changed':<28}{'':>10}{cached_wall:>11.1f}   no change reported: {no_change}")
    print(f"overhead_ratio={run_wall / bare_sum:.3f} flow_stages_s={sum(in_flow.values()):.1f} "
          f"outside_stages_s={run_wall - sum(in_flow.values()):.1f} bare_s={bare_sum:.1f} run_s={run_wall:.1f} "
          f"cached_rerun_s={cached_wall:.1f} no_change={str(no_change).lower()} recipe={Path(args.recipe).parent.name}")


if __name__ == "__main__":
    main()
