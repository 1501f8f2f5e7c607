"""merge_exposition: every replica's samples summed into one Prometheus text."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.metrics import Metrics, merge_exposition


def test_metrics_of_replicas_are_summed() -> None:
    replicas = [Metrics(), Metrics()]
    for n, m in enumerate(replicas, start=1):
        m.requests.labels("/v1/predict", "POST", "200").inc(n)
        m.latency.labels("/v1/predict").observe(0.01 * n)
        m.in_flight.set(n)
    replicas[1].requests.labels("/v1/labels", "POST", "415").inc()
    text = merge_exposition([m.replica_text() for m in replicas]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    predict = (("method", "POST"), ("route", "/v1/predict"), ("status", "200"))
    assert samples[("visionloop_requests_total", predict)] == 3
    assert samples[("visionloop_requests_total", (("method", "POST"), ("route", "/v1/labels"),
                                                  ("status", "415")))] == 1
    assert samples[("visionloop_request_seconds_count", (("route", "/v1/predict"),))] == 2
    assert samples[("visionloop_request_seconds_sum", (("route", "/v1/predict"),))] == \
        pytest.approx(0.03)
    assert samples[("visionloop_requests_in_flight", ())] == 3
    assert not any(name.endswith("_created") for name, _ in samples)
    assert text.count("# TYPE visionloop_requests_total counter") == 1
