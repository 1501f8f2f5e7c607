"""Prometheus metrics of the API.

Each replica counts its own requests, latency, requests in flight, predictions and inference
batch sizes (`Metrics.registry`); `/metrics` sums those over every replica (`merge_exposition`)
and adds what it computes once for the whole service when scraped (`Metrics.shared`: the
version each replica serves, load failures, jobs by status).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

disable_created_metrics()  # `_created` samples cannot be summed across replicas


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("visionloop_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("visionloop_request_seconds", "HTTP request latency",
                                 ["route"], registry=r)
        self.in_flight = Gauge("visionloop_requests_in_flight", "requests in flight", registry=r)
        self.predictions = Counter("visionloop_predictions", "images classified", ["version"],
                                   registry=r)
        self.predictions_not_stored = Counter(
            "visionloop_predictions_not_stored",
            "predictions answered but not kept for feedback and review, by reason "
            "(low_space: the volume's free space is below VISIONLOOP_MIN_FREE_BYTES)",
            ["reason"], registry=r)
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
