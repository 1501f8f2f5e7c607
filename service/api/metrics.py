"""Prometheus metrics of the API.

Each replica counts its own requests, latency, requests in flight, predictions and inference
batch sizes (`Metrics.registry`); `/metrics` sums those over every replica (`merge_exposition`)
and adds what it computes once for the whole service when scraped (`Metrics.shared`: the
version each replica serves, load failures, jobs by status; with the settings,
`ModelQuality`: the served version's calibration error before and after temperature scaling,
read from its manifest, and its drift score from the prediction store).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from service.drift import version_drift
from service.predictions import PredictionStore
from training.calibration import CONFIDENCE_EDGES
from training.errors import DomainError
from training.registry import InvalidVersion, Registry, VersionNotFound

if TYPE_CHECKING:  # service.settings imports the model zoo
    from service.settings import Settings

log = logging.getLogger(__name__)

disable_created_metrics()  # `_created` samples cannot be summed across replicas


class ModelQuality:
    """A collector of `Metrics.shared`: per served version (CURRENT), what its manifest records
    about its answers, read when scraped (a version's files never change once published):
    `visionloop_model_ece{version, calibration="before"|"after"}` (expected calibration error
    on the held-out split, `training.calibration.ECE_BINS` bins) and
    `visionloop_model_temperature{version}`; and its drift (`service.drift`):
    `visionloop_drift_score{version, part="labels"|"confidence"|"max"}` (population stability
    index, present once `drift_min_predictions` live answers are kept),
    `visionloop_drift_live_answers{version}` and `visionloop_drift_threshold`. A version
    without a `calibration` or `reference` record (v0, older versions) has no sample.

    It runs when /metrics is built (at most once per `ops_cache_s`): one manifest read and one
    indexed query of at most `drift_window` rows, small enough for the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings.home)
        self.predictions = PredictionStore.from_settings(settings)

    def served(self) -> list[str]:
        current = self.registry.current()
        return [current] if current else []

    def collect(self) -> Iterator[Metric]:
        ece = GaugeMetricFamily("visionloop_model_ece", "expected calibration error of the "
                                "version's scores on its held-out split, before and after "
                                "temperature scaling", labels=["version", "calibration"])
        temperature = GaugeMetricFamily("visionloop_model_temperature",
                                        "the version's calibration temperature",
                                        labels=["version"])
        drift = GaugeMetricFamily("visionloop_drift_score", "population stability index of the "
                                  "version's live answers against its held-out split",
                                  labels=["version", "part"])
        live = GaugeMetricFamily("visionloop_drift_live_answers",
                                 "live answers the drift score compared", labels=["version"])
        for version in self.served():
            try:
                calibration = self.registry.manifest(version).get("calibration") or {}
                block = version_drift(self.registry, self.predictions, version, self.settings)
            except (VersionNotFound, InvalidVersion, DomainError) as exc:
                log.warning("metrics: no quality figures for %s: %s", version, exc)
                continue
            if block is not None:
                live.add_metric([version], block["count"])
                for part, key in (("labels", "label_psi"), ("confidence", "confidence_psi"),
                                  ("max", "score")):
                    if block[key] is not None:
                        drift.add_metric([version, part], block[key])
            for stage in ("before", "after"):
                value = calibration.get(f"ece_{stage}")
                if isinstance(value, int | float):
                    ece.add_metric([version, stage], float(value))
            if isinstance(calibration.get("temperature"), int | float):
                temperature.add_metric([version], float(calibration["temperature"]))
        yield ece
        yield temperature
        yield drift
        yield live
        yield GaugeMetricFamily("visionloop_drift_threshold", "drift score above which a "
                                "version counts as drifted", value=self.settings.drift_threshold)


class Metrics:
    def __init__(self, settings: Settings | None = None) -> None:
        """`settings`: the service whose served versions `ModelQuality` reports (None: none)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("visionloop_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("visionloop_request_seconds", "HTTP request latency",
                                 ["route"], registry=r)
        self.in_flight = Gauge("visionloop_requests_in_flight", "requests in flight", registry=r)
        self.predictions = Counter("visionloop_predictions", "images classified", ["version"],
                                   registry=r)
        self.shadow = Counter("visionloop_shadow_answers",
                              "requests a shadow version also classified", ["version"],
                              registry=r)
        self.shadow_agreed = Counter("visionloop_shadow_agreements",
                                     "shadow answers with the served answer's label",
                                     ["version"], registry=r)
        self.unknown = Counter("visionloop_predictions_unknown",
                               "images answered `unknown` (best score below the threshold)",
                               ["version"], registry=r)
        self.predictions_not_stored = Counter(
            "visionloop_predictions_not_stored",
            "predictions answered but not kept for feedback and review, by reason "
            "(low_space: the volume's free space is below VISIONLOOP_MIN_FREE_BYTES)",
            ["reason"], registry=r)
        self.scores = Histogram("visionloop_prediction_score",
                                "calibrated best score of each answer, by version",
                                ["version"], buckets=CONFIDENCE_EDGES[1:], registry=r)
        self.batch_size = Histogram("visionloop_inference_batch_size",
                                    "size of the inference batch each image was classified in",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.shared = s = CollectorRegistry()
        self.model = Gauge("visionloop_model_info", "served model version (1 per replica)",
                           ["version"], registry=s)
        self.reload_failures = Gauge("visionloop_model_reload_failures",
                                     "model versions that failed to load, summed over replicas",
                                     registry=s)
        self.jobs = Gauge("visionloop_training_jobs", "training jobs by status", ["status"],
                          registry=s)
        self.quality = ModelQuality(settings) if settings is not None else None
        if self.quality is not None:
            s.register(self.quality)

    def replica_text(self) -> str:
        """This replica's own metrics, Prometheus text (what `merge_exposition` sums)."""
        return generate_latest(self.registry).decode()


class _Families:
    """A prometheus_client collector that yields fixed metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_exposition(texts: list[str]) -> bytes:
    """Prometheus texts of several replicas -> one text, every sample (same name and labels)
    summed: counters, histograms and the in-flight gauge all add up across replicas."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[family.name][key] = values[family.name].get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
