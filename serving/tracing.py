"""Chat requests as MLflow traces: a root `chat` span with a `retrieval` span and a `generation` span, in the
experiment `trace_experiment`, so the MLflow UI's Traces tab shows real traffic (question, sources, answer,
model, tokens, latency). Spans are started without a context (`start_span_no_context`): a streamed answer ends
in another thread than the one that started it. A tracing failure never fails a chat: it is logged once.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Tracer:
    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.experiment_id = None
        self._warned = False
        if not enabled:
            return
        try:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            client = mlflow.MlflowClient(tracking_uri)
            found = client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        except Exception as e:  # the service serves without traces rather than not at all
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        if not self._warned:
            log.warning("MLflow tracing is off: %s", type(e).__name__)
            self._warned = True
        self.enabled = False

    def start(self, name: str, inputs: dict, tags: dict, session: str | None):
        """A root span (None when tracing is off or fails)."""
        if not self.enabled:
            return None
        try:
            import mlflow

            metadata = {"mlflow.trace.session": session} if session else None
            return mlflow.start_span_no_context(name, span_type="CHAIN", inputs=inputs, tags=tags, metadata=metadata,
                                                experiment_id=self.experiment_id)
        except Exception as e:
            self._fail(e)
            return None

    def child(self, parent, name: str, span_type: str, inputs: dict | None = None, attributes: dict | None = None):
        if parent is None:
            return None
        try:
            import mlflow

            return mlflow.start_span_no_context(name, span_type=span_type, parent_span=parent, inputs=inputs,
                                                attributes=attributes)
        except Exception as e:
            self._fail(e)
            return None

    def end(self, span, outputs=None, attributes: dict | None = None, error: str | None = None) -> None:
        if span is None:
            return
        try:
            if attributes:
                span.set_attributes(attributes)
            if error is not None:
                span.set_status("ERROR")
                span.set_attribute("error", error)
            span.end(outputs=outputs)
        except Exception as e:
            self._fail(e)


def trace_id(span) -> str | None:
    return getattr(span, "trace_id", None) if span is not None else None
