"""The dashboard and the alert rules query only metrics (and labels) the project exports, and the
exported names follow Prometheus conventions. No server: the processes' metric modules are imported
as their processes import them, and the queue collector reads a fake Redis.

tests/integration/test_metrics_contract_scrape.py checks the same against a running worker's /metrics.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import shelfsight.shared.relay.metrics
import shelfsight.trainer.metrics
import shelfsight.worker.metrics
from shelfsight.shared.observability import QueueCollector
from tests.metrics_contract import (
    ALERTS,
    DASHBOARD,
    ROOT,
    exported_series,
    label_names,
    problems,
    queries,
)

# Imported for their side effect, as their processes import them: each registers its metrics.
assert shelfsight.shared.relay.metrics and shelfsight.trainer.metrics and shelfsight.worker.metrics


class _FakePipeline:
    def __init__(self) -> None:
        self.replies: list[Any] = []

    def llen(self, _: str) -> None:
        self.replies.append(3)

    def lindex(self, _: str, __: int) -> None:
        self.replies.append(json.dumps({"headers": {"shelfsight_enqueued_at": 100.0}}))

    def hlen(self, _: str) -> None:
        self.replies.append(2)

    def execute(self) -> list[Any]:
        return self.replies


class _FakeRedis:
    def pipeline(self, transaction: bool = False) -> _FakePipeline:
        return _FakePipeline()


@pytest.fixture(scope="module")
def queue_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(QueueCollector(_FakeRedis(), ["extract", "training"], clock=lambda: 160.0))  # type: ignore[arg-type]
    return registry


@pytest.fixture(scope="module")
def exposition(queue_registry: CollectorRegistry) -> str:
    return generate_latest(REGISTRY).decode() + generate_latest(queue_registry).decode()


def test_dashboard_and_alert_rules_query_only_exported_metrics_and_labels(
        exposition: str, queue_registry: CollectorRegistry) -> None:
    found = problems(exported_series(exposition), label_names(REGISTRY, queue_registry))
    assert not found, "\n".join(found)


def test_the_checker_catches_a_metric_or_label_nobody_exports(exposition: str, queue_registry: CollectorRegistry,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract check itself can fail (a typo'd name or label in a query is reported)."""
    import tests.metrics_contract as contract

    monkeypatch.setattr(contract, "queries", lambda: [
        contract.Query("typo", "rate(shelfsight_event_total[5m])", {"shelfsight_event_total"}),
        contract.Query("label", 'sum by (status) (shelfsight_events_total{status="x"})', {"shelfsight_events_total"}),
    ])
    found = problems(exported_series(exposition), label_names(REGISTRY, queue_registry))
    assert any("shelfsight_event_total is not exported" in p for p in found)
    assert any("no label 'status'" in p for p in found) and any("label 'status'" in p for p in found)


def test_queue_collector_reports_depth_and_age_from_the_enqueue_header(exposition: str) -> None:
    assert 'shelfsight_queue_messages{queue="extract"} 3.0' in exposition
    assert 'shelfsight_queue_oldest_message_age_seconds{queue="extract"} 60.0' in exposition
    assert "shelfsight_broker_unacked_messages 2.0" in exposition


def test_exported_names_follow_prometheus_conventions(exposition: str, queue_registry: CollectorRegistry) -> None:
    types = {n: t for n, t in re.findall(r"^# TYPE (shelfsight_\S+) (\S+)$", exposition, re.MULTILINE)
             if not n.endswith("_created")}
    assert len(types) > 30
    for name, kind in types.items():
        assert re.fullmatch(r"shelfsight_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), f"{name}: only counters end in _total"
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|percent)$", name), f"{name}: base units"
        if name.endswith("_info"):
            assert kind == "gauge"
    unbounded = {"event_id", "product_id", "image", "key", "uri", "path", "message", "error"}
    for name, labels in label_names(REGISTRY, queue_registry).items():
        if name.startswith("shelfsight_"):
            assert not labels & unbounded, f"{name} has an unbounded label {labels & unbounded}"


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "shelfsight" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
            assert panel["datasource"]["type"] == "prometheus"
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/shelfsight.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/shelfsight"


def test_each_alert_asked_for_exists_and_has_a_runbook_section() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    for wanted in ("ShelfsightDeadLetterRateHigh", "ShelfsightBacklogOld", "ShelfsightNoResults",
                   "ShelfsightModelLoadFailures", "ShelfsightTrainingFailed"):
        assert wanted in rules
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs/operations.md").read_text(), re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    for name, rule in rules.items():
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("docs/operations.md#") and runbook.split("#")[1] in anchors, name


def test_every_query_names_a_metric() -> None:
    assert all(q.names for q in queries())
