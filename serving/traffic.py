"""Logged traffic as data: the chat traces of one release (MLflow) and the training questions it is compared with,
and the drift job that compares them (evaluation.drift) and logs the report to MLflow.

    erpops drift --env staging --since 7d [--emit]    # report in the MLflow experiment erp-assistant-drift

The live sample is read from the chat traces tagged with the release (the root span's question, the retrieval
span's best score, the chunks it kept). The reference is the training questions of the recipe's data, put through
the same retriever on the same release's collection, so a score shift is the traffic's, not the index's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from data_contracts.rules import detect_language, first_user_text
from evaluation.drift import DriftReport, DriftThresholds, Sample, compare, render_drift_html

log = logging.getLogger(__name__)

DRIFT_EXPERIMENT = "erp-assistant-drift"


def live_sample(tracking_uri: str, experiment: str, release: str, since: datetime | None = None,
                limit: int = 5000) -> Sample:
    """The questions chat traces of `release` hold (newest `limit`), as a Sample."""
    import mlflow

    found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    sample = Sample()
    if found is None:
        return sample
    mlflow.set_tracking_uri(tracking_uri)
    filters = [f"tag.release = '{release}'"] + ([f"trace.timestamp_ms > {int(since.timestamp() * 1000)}"] if since else [])
    traces = mlflow.search_traces(locations=[found.experiment_id], filter_string=" AND ".join(filters),
                                  max_results=limit, order_by=["timestamp_ms DESC"], return_type="list", flush=True)
    for t in traces:
        spans = t.data.spans if t.data else []
        root = next((s for s in spans if s.parent_id is None), None)
        retrieval = next((s for s in spans if s.name == "retrieval"), None)
        question = (root.inputs or {}).get("question") if root is not None else None
        if not isinstance(question, str) or retrieval is None:
            continue
        kept = retrieval.outputs if isinstance(retrieval.outputs, list) else []
        sample.add(question, detect_language(question), retrieval.attributes.get("top_score"), bool(kept))
    return sample


def reference_sample(questions: list[str], retriever, collection: str, limit: int = 200) -> Sample:
    """Training questions (every k-th, at most `limit`) through the retriever on `collection`."""
    step = max(1, len(questions) // limit)
    sample = Sample()
    for q in questions[::step][:limit]:
        sources, top = retriever.retrieve(q, collection)
        sample.add(q, detect_language(q), top, bool(sources))
    return sample


@dataclass
class DriftResult:
    report: DriftReport
    html: Path
    run_id: str
    release: str


def drift_job(settings, deploy, mlflow_settings, data_cfg, since: datetime | None, out_dir: Path,
              thresholds: DriftThresholds = DriftThresholds()) -> DriftResult:
    """The drift report of the release `settings.env` serves now, logged to MLflow (metrics, tags and the HTML)."""
    import mlflow

    from data_contracts.contracts import check_corpus
    from deployment.deploy import env_target
    from deployment.releases import ReleaseLedger
    from serving.rag import Retriever

    ledger = ReleaseLedger(mlflow_settings)
    current, _ = ledger.serving(settings.env)
    if current is None:
        raise ValueError(f"{settings.env} serves no release: there is no traffic to judge")
    release = ledger.release(current)
    live = live_sample(mlflow_settings.tracking_uri, settings.trace_experiment, current, since)
    _, _, ds = check_corpus(data_cfg)
    if ds is None:
        raise ValueError(f"the training data at {data_cfg.root} fails its contracts (erpops validate): no reference")
    target = env_target(deploy, settings.env)
    threshold = settings.rag_threshold if settings.rag_threshold is not None else deploy.retrieval_threshold
    retriever = Retriever(deploy.milvus_uri, target.alias, release.embedding_model, settings.rag_k, threshold)
    questions = [first_user_text(e) for e in ds.train]  # not a chat log's system prompt
    reference = reference_sample(questions, retriever, release.collection)
    report = compare(reference, live, thresholds)
    html = render_drift_html(report, reference, live, out_dir / f"drift-{current}.html",
                             f"Drift of {settings.env} ({current}, v{release.model_version})")
    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    client = mlflow.MlflowClient(mlflow_settings.tracking_uri)
    found = client.get_experiment_by_name(DRIFT_EXPERIMENT)
    experiment_id = found.experiment_id if found else client.create_experiment(DRIFT_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"drift-{settings.env}-{current}",
                            tags={"env": settings.env, "release": current, "model_version": release.model_version,
                                  "drifted": str(bool(report.drifted)).lower(), "judged": str(report.judged).lower()})
    for k, v in report.metrics.items():
        if v == v:
            client.log_metric(run.info.run_id, k, v)
    client.log_metric(run.info.run_id, "questions", report.questions)
    client.log_artifact(run.info.run_id, str(html))
    client.set_terminated(run.info.run_id)
    return DriftResult(report, html, run.info.run_id, current)
