"""Users' feedback on chat answers, kept where the answer is: on the chat's MLflow trace, as assessments (MLflow 3's
feedback API), so the MLflow UI shows the thumbs and the corrected answer beside the question, the retrieved
chunks and the answer.

    POST /api/v1/chat/{trace_id}/feedback  {"verdict": "down", "correction": "...", "comment": "..."}
    erpops feedback list --since 7d --model v3 --verdict down

A verdict is the feedback `user_verdict` (true: thumbs up), with the comment as its rationale; a corrected answer
is the expectation `expected_response`. Both carry the source HUMAN and the API key's id (never the key). One
verdict per key and trace: a second one is refused (409), not counted twice. Within one process this holds for
simultaneous requests too (a verdict is claimed before it is written); across replicas only for requests that come
after a verdict was written, since MLflow offers no conditional write: two replicas rated at the same moment by the
same key may both record one.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

VERDICT = "user_verdict"
CORRECTION = "expected_response"


class UnknownTrace(LookupError):
    """No chat trace of that id in the serving experiment."""


class AlreadyRated(ValueError):
    """This key already gave its verdict on this answer."""


@dataclass(frozen=True)
class FeedbackRow:
    trace_id: str
    at: str
    """When the verdict was given (UTC, ISO 8601)."""
    env: str | None
    version: str | None
    release: str | None
    question: str | None
    answer: str | None
    verdict: str
    """"up" or "down"."""
    correction: str | None
    comment: str | None
    actor: str
    sources: tuple[str, ...] = ()
    """Documents the answer cited (their module is the module of a curated row)."""

    def to_dict(self) -> dict:
        return asdict(self)


_CLAIMS: OrderedDict[tuple[str, str], None] = OrderedDict()
"""(trace id, actor) of the verdicts this process is writing or wrote, newest last: a request that read the trace
before a simultaneous one wrote its verdict is refused here. The newest 10,000 are plenty: a request's read and
check are a moment apart."""
_CLAIMS_LOCK = threading.Lock()


def _claim(trace_id: str, actor: str) -> bool:
    """Take the right to write `actor`'s verdict on a trace; False when this process took it already."""
    with _CLAIMS_LOCK:
        if (trace_id, actor) in _CLAIMS:
            return False
        _CLAIMS[(trace_id, actor)] = None
        while len(_CLAIMS) > 10_000:
            _CLAIMS.popitem(last=False)
        return True


def _unclaim(trace_id: str, actor: str) -> None:
    with _CLAIMS_LOCK:
        _CLAIMS.pop((trace_id, actor), None)


def _source(actor: str):
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    return AssessmentSource(AssessmentSourceType.HUMAN, actor)


def _trace(trace_id: str, experiment_id: str):
    import mlflow

    trace = mlflow.get_trace(trace_id, silent=True, flush=True) if re.fullmatch(r"tr-[0-9a-f]{32}", trace_id) else None
    location = getattr(getattr(trace, "info", None), "experiment_id", None) if trace else None
    if trace is None or location != experiment_id:
        raise UnknownTrace(f"no chat answer with trace id {trace_id!r}")
    return trace


def record_feedback(trace_id: str, experiment_id: str, verdict: str, actor: str, correction: str | None = None,
                    comment: str | None = None) -> dict:
    """The verdict (and the corrected answer) on the chat's trace. UnknownTrace for a trace that is not a chat of
    this service; AlreadyRated when `actor` already gave a verdict on it, or is giving one in this process now."""
    import mlflow

    if verdict not in ("up", "down"):
        raise ValueError(f"verdict must be 'up' or 'down', got {verdict!r}")
    trace = _trace(trace_id, experiment_id)
    rated = any(a.name == VERDICT and a.source.source_id == actor for a in trace.info.assessments)
    if rated or not _claim(trace_id, actor):
        raise AlreadyRated(f"{actor} already rated the answer of trace {trace_id}")
    # the correction first: the verdict is what makes a retry "already rated", so a verdict written without the
    # correction that came with it would lose the correction for good (an earlier try that wrote the correction
    # and failed on the verdict has its correction kept, not written twice)
    earlier = next((a for a in trace.info.assessments if a.name == CORRECTION and a.source.source_id == actor), None)
    try:
        corrected = (earlier or mlflow.log_expectation(trace_id=trace_id, name=CORRECTION, value=correction,
                                                       source=_source(actor))) if correction else None
        fb = mlflow.log_feedback(trace_id=trace_id, name=VERDICT, value=verdict == "up", source=_source(actor),
                                 rationale=comment or None)
    except BaseException:
        _unclaim(trace_id, actor)
        raise
    tags = trace.info.tags or {}
    return {"trace_id": trace_id, "verdict": verdict, "feedback_id": fb.assessment_id,
            "correction_id": corrected.assessment_id if corrected else None,
            "env": tags.get("env"), "version": tags.get("model_version")}


def parse_since(since: str | None, now: datetime | None = None) -> datetime | None:
    """`7d`, `12h`, `30m` before now, or an ISO date/time (UTC when it names no zone); None: no bound."""
    if not since:
        return None
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"(\d+)([dhm])", since.strip())
    if m:
        return now - timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]: int(m.group(1))})
    try:
        t = datetime.fromisoformat(since)
    except ValueError:
        raise ValueError(f"--since {since!r}: give 7d, 12h, 30m or an ISO date such as 2026-12-01") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def feedback_rows(traces: Sequence, since: datetime | None = None, version: str | None = None,
                  verdict: str | None = None) -> list[FeedbackRow]:
    """One row per verdict on the given traces, filtered; pure over the trace objects. A correction belongs to
    the verdict of the same actor."""
    rows = []
    for t in traces:
        tags = t.info.tags or {}
        if version and tags.get("model_version") != version.lstrip("v"):
            continue
        root = next((s for s in t.data.spans if s.parent_id is None), None) if t.data and t.data.spans else None
        question = (root.inputs or {}).get("question") if root is not None else None
        outputs = root.outputs if root is not None and isinstance(root.outputs, dict) else {}
        answer, cited = outputs.get("answer"), tuple(s.get("doc") for s in outputs.get("sources") or () if s.get("doc"))
        corrections = {a.source.source_id: a.value for a in t.info.assessments if a.name == CORRECTION}
        for a in t.info.assessments:
            if a.name != VERDICT:
                continue
            said = "up" if a.value is True else "down"
            at = datetime.fromtimestamp(a.create_time_ms / 1000, timezone.utc)
            if (verdict and said != verdict) or (since and at < since):
                continue
            rows.append(FeedbackRow(t.info.trace_id, at.isoformat(timespec="seconds"), tags.get("env"),
                                    tags.get("model_version"), tags.get("release"), question, answer, said,
                                    corrections.get(a.source.source_id), a.rationale, a.source.source_id, cited))
    return sorted(rows, key=lambda r: r.at)


def list_feedback(tracking_uri: str, experiment: str, since: datetime | None = None, version: str | None = None,
                  verdict: str | None = None, limit: int = 20_000) -> list[FeedbackRow]:
    """The verdicts given on chat answers in the serving experiment, oldest first (among the newest `limit`
    traces that match; a warning says when that bound was reached)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    mlflow.set_tracking_uri(tracking_uri)
    filters = [f"feedback.{VERDICT} = '{'true' if verdict == 'up' else 'false'}'"] if verdict else []
    if version:
        filters.append(f"tag.model_version = '{version.lstrip('v')}'")
    traces = mlflow.search_traces(locations=[found.experiment_id], filter_string=" AND ".join(filters) or None,
                                  max_results=limit, order_by=["timestamp_ms DESC"], return_type="list", flush=True)
    if len(traces) >= limit:
        import logging

        logging.getLogger(__name__).warning("feedback: the newest %d traces were read; older verdicts are left out",
                                            limit)
    return feedback_rows([t for t in traces if any(a.name == VERDICT for a in t.info.assessments)], since, version,
                         verdict)


def format_feedback(rows: Sequence[FeedbackRow]) -> str:
    lines = ["time (UTC)           verdict version env       trace                                question -> correction"]
    for r in rows:
        q = (r.question or "").replace("\n", " ")[:40]
        c = f" -> {r.correction[:40]}" if r.correction else ""
        lines.append(f"{r.at[:19].replace('T', ' '):<20} {r.verdict:<7} {('v' + r.version) if r.version else '-':<7} "
                     f"{r.env or '-':<9} {r.trace_id:<36} {q}{c}".rstrip())
    lines.append(f"{len(rows)} verdicts: {sum(r.verdict == 'up' for r in rows)} up, "
                 f"{sum(r.verdict == 'down' for r in rows)} down, {sum(bool(r.correction) for r in rows)} corrected")
    return "\n".join(lines)
