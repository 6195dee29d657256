"""What the dashboard and the alert rules query, and what the processes export (metrics contract)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client import REGISTRY, CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "shelfsight.json"
ALERTS = GRAFANA / "alerts.yml"

# Series Prometheus itself adds to every scrape; queries may use them.
PROMETHEUS_BUILTINS = {"up"}
# Labels Prometheus attaches to every target, plus the histogram bucket label.
TARGET_LABELS = {"job", "instance", "le"}

_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_SHELFSIGHT = re.compile(r"\bshelfsight_[a-zA-Z0-9_]+\b")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def exported_series(exposition: str) -> dict[str, str]:
    """Series names a /metrics text exposes (from its TYPE lines, so empty families count) -> type."""
    series: dict[str, str] = {}
    for name, kind in _TYPE_LINE.findall(exposition):
        series[name] = kind
        if kind == "histogram":
            series.update({f"{name}_bucket": kind, f"{name}_sum": kind, f"{name}_count": kind})
        elif kind == "summary":
            series.update({f"{name}_sum": kind, f"{name}_count": kind})
    return series


def label_names(*registries: CollectorRegistry) -> dict[str, set[str]]:
    """Label names of every series, from the metric objects (children or not) and collected samples."""
    labels: dict[str, set[str]] = {}
    for registry in registries or (REGISTRY,):
        for name, collector in registry._names_to_collectors.items():  # private, but no public API has it
            names = getattr(collector, "_labelnames", None) or getattr(collector, "labelnames", None)
            if names is not None:
                labels.setdefault(name, set()).update(names)
        for family in registry.collect():
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    for name in list(labels):  # a histogram's buckets also carry `le`; its family name lists its labels
        for suffix in ("_bucket", "_sum", "_count"):
            labels.setdefault(name + suffix, set()).update(labels[name])
    return labels


@dataclass
class Query:
    where: str
    expr: str
    names: set[str] = field(default_factory=set)


def queries() -> list[Query]:
    """Every PromQL expression of the dashboard's panels and of the alert rules."""
    found = []
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append(Query(f"dashboard panel {panel['title']!r}", target["expr"]))
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found.append(Query(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
    for query in found:
        query.names = set(_SHELFSIGHT.findall(query.expr)) | {
            name for name, _ in _SELECTOR.findall(query.expr) if not name.startswith("__")}
    return found


def problems(exported: dict[str, str], labels: dict[str, set[str]]) -> list[str]:
    """Every metric or label a query uses that no process exports, as readable lines."""
    found = []
    for query in queries():
        for name in sorted(query.names):
            if name not in exported and name not in PROMETHEUS_BUILTINS:
                found.append(f"{query.where}: metric {name} is not exported")
        for name, matchers in _SELECTOR.findall(query.expr):
            known = labels.get(name, set()) | TARGET_LABELS
            for label in _MATCHER.findall(matchers):
                if name in exported and label not in known:
                    found.append(f"{query.where}: {name} has no label {label!r} (has {sorted(known)})")
        query_labels = set().union(*(labels.get(n, set()) for n in query.names)) | TARGET_LABELS
        for group in _BY.findall(query.expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in query_labels:
                    found.append(f"{query.where}: no metric of {sorted(query.names)} has label {label!r}")
    return found
