"""Registry state for humans and machines: `erpops status [--json]`."""

from __future__ import annotations

from erpops.config import MLflowSettings

KEY_METRICS = ("eval/rouge_l", "eval/perplexity", "eval/size_mb", "train/final_loss")


def registry_state(settings: MLflowSettings) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.registered_model_name
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        return {"model": name, "tracking_uri": settings.tracking_uri, "aliases": {}, "versions": []}
    aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    versions = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version), reverse=True):
        metrics = {}
        if mv.run_id:
            try:
                run_metrics = client.get_run(mv.run_id).data.metrics
                metrics = {k: run_metrics[k] for k in KEY_METRICS if k in run_metrics}
            except MlflowException:
                pass
        versions.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                         "created": mv.creation_timestamp, "run_id": mv.run_id, "source": mv.source,
                         "metrics": metrics, "tags": dict(mv.tags or {})})
    return {"model": name, "tracking_uri": settings.tracking_uri, "aliases": aliases, "versions": versions}


def format_state(state: dict) -> str:
    lines = [f"model {state['model']}  ({state['tracking_uri']})"]
    if not state["versions"]:
        return lines[0] + "\n  no versions yet: run `erpops run`"
    lines.append("  aliases: " + ", ".join(f"{a}=v{v}" for a, v in sorted(state["aliases"].items())))
    for v in state["versions"]:
        m = v["metrics"]
        lines.append(f"  v{v['version']:<4} {','.join(v['aliases']) or '-':<28} gate={v['tags'].get('gate_verdict', '?'):<8}"
                     f" rouge_l={m.get('eval/rouge_l', float('nan')):.4f} ppl={m.get('eval/perplexity', float('nan')):.2f}"
                     f" data={v['tags'].get('dataset_digest', '')[:12]}")
    return "\n".join(lines)
