"""Chat requests as MLflow traces: a root `chat` span with a `retrieval` span and a `generation` span, in the
experiment `trace_experiment`, so the MLflow UI's Traces tab shows real traffic (question, sources, answer,
model, tokens, latency). Spans are started without a context (`start_span_no_context`): a streamed answer ends
in another thread than the one that started it. A tracing failure never fails a chat: it is logged (the first
of a run of failures, and the recovery), and tracing goes on with the next chat: an MLflow server that was down
when the service started, or for a minute since, does not turn tracing off for the life of the process.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Tracer:
    RETRY_S = 30.0
    """Seconds between two looks for the trace experiment while the tracking server does not answer."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        """Tracing as configured (`trace`); whether it works now is `available`."""
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.experiment_id = None
        self._failing = False
        self._next_look = 0.0
        if enabled:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            self._find_experiment()

    @property
    def available(self) -> bool:
        """Configured on, and the trace experiment known (looked for again at most every RETRY_S)."""
        return self.enabled and self._find_experiment() is not None

    def _find_experiment(self) -> str | None:
        import time

        if self.experiment_id is not None or time.monotonic() < self._next_look:
            return self.experiment_id
        try:
            import mlflow

            client = mlflow.MlflowClient(self.tracking_uri)
            found = client.get_experiment_by_name(self.experiment)
            self.experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            self._ok()
        except Exception as e:  # the service serves without traces rather than not at all
            self._next_look = time.monotonic() + self.RETRY_S
            self._fail(e)
        return self.experiment_id

    def _fail(self, e: Exception) -> None:
        if not self._failing:
            log.warning("MLflow tracing failed (%s: %s); chats go on untraced until it works again",
                        type(e).__name__, e)
            self._failing = True

    def _ok(self) -> None:
        if self._failing:
            log.warning("MLflow tracing works again")
            self._failing = False

    def start(self, name: str, inputs: dict, tags: dict, session: str | None):
        """A root span (None when tracing is off or fails)."""
        if not self.available:
            return None
        try:
            import mlflow

            metadata = {"mlflow.trace.session": session} if session else None
            span = mlflow.start_span_no_context(name, span_type="CHAIN", inputs=inputs, tags=tags, metadata=metadata,
                                                experiment_id=self.experiment_id)
            self._ok()
            return span
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
