"""Registry state for humans and machines.

    erpops status [--json]                          # versions, aliases, key metrics, lineage
    erpops status --history [--json]                # the promotion ledger, newest last
    erpops status --at 2026-11-21T10:00:00 [--json] # the champion at that time (UTC)
"""

from __future__ import annotations

from datetime import datetime

from erpops.config import MLflowSettings
from registry import ledger

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



def history_state(settings: MLflowSettings) -> dict:
    """The ledger (oldest first), where it is stored, and any managed alias where it and the registry disagree."""
    import mlflow

    from registry.promote import current_aliases

    entries = ledger.read_ledger(settings)
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    drift = ledger.ledger_drift(entries, current_aliases(client, settings.registered_model_name), settings.aliases)
    return {"model": settings.registered_model_name, "ledger": f"{ledger.ledger_path(settings)} (table {ledger.TABLE})",
            "entries": [e.to_dict() for e in entries],
            "drift": {a: {"ledger": led, "registry": reg} for a, (led, reg) in drift.items()}}


def format_history(state: dict) -> str:
    lines = [f"model {state['model']}  alias ledger: {state['ledger']}",
             ledger.format_history([ledger.LedgerEntry(**e) for e in state["entries"]])]
    for alias, d in state["drift"].items():
        lines.append(f"  note: {alias} is {_v(d['registry'])} in the registry but {_v(d['ledger'])} per the ledger "
                     "(moved before the ledger existed, outside erpops, or the ledger write was lost)")
    return "\n".join(lines)


def champion_at_state(settings: MLflowSettings, when: str | datetime) -> dict:
    """Which version was champion at `when` (naive times are UTC), per the ledger."""
    t = ledger.parse_when(when)
    return {"model": settings.registered_model_name, "at": t.isoformat(), "champion": ledger.champion_at(settings, t)}


def format_champion_at(state: dict) -> str:
    if state["champion"] is None:
        return f"no champion of {state['model']} at {state['at']} (per the alias ledger)"
    return f"champion of {state['model']} at {state['at']}: v{state['champion']}"


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
