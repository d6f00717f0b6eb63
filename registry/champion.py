"""The model now in production, fetched so the gate can score it on the candidate's eval examples.

The champion is re-scored rather than compared by its stored metrics: a paired comparison needs both
models' answers to the same examples with the same code, and the eval split changes with the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from erpops.config import MLflowSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChampionModel:
    version: str
    """Version holding the champion alias when it was read (the pipeline's compare-and-set expects it)."""
    gguf: Path | None
    """Its shipped GGUF, downloaded from the registry; None when its artifacts are gone."""
    metrics: dict[str, float] | None
    """The metrics its own evaluation logged (reported when it cannot be re-scored)."""


def fetch_champion(settings: MLflowSettings, dest: Path) -> ChampionModel | None:
    """The champion's version, stored metrics and GGUF (downloaded under `dest`); None without a champion."""
    import mlflow

    from registry.promote import RETENTION_TAG, _client, read_champion

    champion = read_champion(settings)
    if champion.version is None:
        return None
    tags = _client(settings).get_model_version(settings.registered_model_name, champion.version).tags
    if RETENTION_TAG in tags:  # cannot happen to a version holding an alias, unless done by hand
        log.warning("champion v%s: its artifacts were deleted (%s); the gate cannot re-score it",
                    champion.version, tags[RETENTION_TAG])
        return ChampionModel(champion.version, None, champion.metrics)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    # a transient store error propagates (the flow's task retries it); it must not silently weaken the gate
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{settings.registered_model_name}/{champion.version}",
                                                     dst_path=str(dest / f"v{champion.version}")))
    found = sorted(local.rglob("*.gguf"))
    if not found:
        log.warning("champion v%s: no GGUF among its model artifacts; the gate cannot re-score it", champion.version)
    return ChampionModel(champion.version, found[0] if found else None, champion.metrics)
