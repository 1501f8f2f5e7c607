"""Drift of a served version: its live answers (the prediction store, shared by every replica)
against what it answered on its held-out split at publish (the manifest's `reference`), by
`training.calibration.drift` (population stability index; the docstring there says why).

The live side is the newest `Settings.drift_window` answers of that version in the prediction
store, so it follows the traffic of every replica without a cross-replica sum, and it is as
long-lived as the store (`VISIONLOOP_PREDICTIONS_KEEP`, the age limit): with the store off
(`predictions_keep` 0) no answer is kept and no score is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.predictions import PredictionStore
from training.calibration import drift
from training.registry import Registry

if TYPE_CHECKING:
    from service.settings import Settings


def version_drift(registry: Registry, predictions: PredictionStore, version: str,
                  settings: Settings) -> dict[str, Any] | None:
    """The `drift` block of `version` (`training.calibration.drift`), or None for a version
    published without a reference (v0, older versions). Raises VersionNotFound."""
    ref = registry.manifest(version).get("reference")
    if not isinstance(ref, dict) or not ref.get("label_shares"):
        return None
    labels, scores = predictions.recent_answers(version, settings.drift_window)
    block = drift(ref, labels, scores, settings.drift_threshold, settings.drift_min_predictions)
    block["window"] = settings.drift_window
    return block
