"""The labelled children kept by app.metrics (`Children`): each is the child
prometheus-client's `labels` hands out, looked up once, and what goes through it is
exported exactly as through `labels`."""

from __future__ import annotations

from app.metrics import Children, ServiceMetrics


def _value(metrics: ServiceMetrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_child_is_looked_up_once_and_is_prometheus_own() -> None:
    metrics = ServiceMetrics()
    children = Children(metrics.http_requests)
    first = children("viewer", "ok")
    assert children("viewer", "ok") is first
    assert first is metrics.http_requests.labels(operation="viewer", outcome="ok")
    assert children("viewer", "FORBIDDEN") is not first
    assert len(children.children) == 2


def test_requests_and_claims_are_exported_as_before() -> None:
    metrics = ServiceMetrics()
    for _ in range(3):
        metrics.request("viewer", "ok", 0.002)
    metrics.request("viewer", "FORBIDDEN", 0.3)
    metrics.claimed(0.004, found=True)
    metrics.claimed(0.02, found=False)
    assert _value(metrics, "fleetbridge_http_requests_total",
                  {"operation": "viewer", "outcome": "ok"}) == 3
    assert _value(metrics, "fleetbridge_http_requests_total",
                  {"operation": "viewer", "outcome": "FORBIDDEN"}) == 1
    assert _value(metrics, "fleetbridge_http_request_duration_seconds_count",
                  {"operation": "viewer"}) == 4
    assert _value(metrics, "fleetbridge_http_request_duration_seconds_bucket",
                  {"operation": "viewer", "le": "0.005"}) == 3
    assert _value(metrics, "fleetbridge_claim_duration_seconds_count",
                  {"outcome": "claimed"}) == 1
    assert _value(metrics, "fleetbridge_claim_duration_seconds_count",
                  {"outcome": "empty"}) == 1
