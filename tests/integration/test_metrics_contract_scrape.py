"""Scrape a running extraction worker's /metrics and hold the dashboard and alert rules to it.

The worker runs in this process (tests.helpers.extraction_worker) with SHELFSIGHT_METRICS_PORT
set, processes one upload, and is scraped over HTTP. The relay's and the trainer's metric modules
are imported as their processes import them, so the same exposition carries their families.
When a `prometheus` binary is installed (Debian package `prometheus`), a real Prometheus also
scrapes the worker and evaluates every dashboard query and alert rule without error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import shelfsight.shared.relay.metrics
import shelfsight.trainer.metrics
from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.dev.services import free_port, wait_for_port
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.observability import serving_metrics
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.worker.runtime import runtime_of
from tests.helpers import extraction_worker, jpeg_bytes, wait_for
from tests.metrics_contract import ALERTS, exported_series, label_names, problems, queries

# Imported for their side effect, as their processes import them: each registers its metrics.
assert shelfsight.shared.relay.metrics and shelfsight.trainer.metrics


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


def _get(url: str) -> str:
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # say who answered: the worker's listener, or something else
        raise AssertionError(f"GET {url}: HTTP {exc.code}, Server: {exc.headers.get('Server')!r}, "
                             f"body: {exc.read()[:500]!r}") from exc


def test_running_worker_exports_every_metric_the_dashboard_and_rules_query(settings: Settings,
                                                                           tmp_path: Path) -> None:
    port = free_port()
    s = settings.model_copy(update={"metrics_port": port, "metrics_address": "127.0.0.1"})
    store = S3ObjectStore(s)
    store.put(s.bucket, "uploads/tops/m1.jpg", jpeg_bytes(), "image/jpeg")
    with extraction_worker(s) as app:
        # What Celery's worker_ready signal does in `shelfsight worker` (the test worker does not
        # send it): load the base model, then serve /metrics on the settings' address and port.
        runtime_of(app).warm_up()
        assert serving_metrics(s), f"the worker's /metrics listener did not start on port {port}"
        wait_for_port(port, 60)
        flagged_before = REGISTRY.get_sample_value("shelfsight_attributes_needing_review_total",
                                                   {"attribute": "sleeve_length", "category": "tops"}) or 0.0
        enqueue_upload(create_celery_app(s), product_id="m1", category="tops",
                       image=f"s3://{s.bucket}/uploads/tops/m1.jpg")
        wait_for(lambda: store.exists(s.bucket, "results/tops/m1.json"), timeout=60)
        exposition = _get(f"http://127.0.0.1:{port}/metrics")
        found = problems(exported_series(exposition), label_names(REGISTRY))
        assert not found, "\n".join(found)
        # The scrape carries live values from this worker, not just family names.
        assert 'shelfsight_events_total{category="tops",outcome="result"}' in exposition
        assert 'shelfsight_model_info{category="tops",version="zero-shot"} 1.0' in exposition
        assert 'shelfsight_attribute_confidence_count{attribute=' in exposition
        # zero-shot answers are all flagged for review, and counted (one more than before this upload)
        flagged = f'shelfsight_attributes_needing_review_total{{attribute="sleeve_length",category="tops"}} {flagged_before + 1.0}'
        assert flagged in exposition
        assert 'shelfsight_queue_messages{queue="extract"} 0.0' in exposition
        assert "shelfsight_batcher_backlog 0.0" in exposition
        if shutil.which("prometheus"):
            _prometheus_evaluates_everything(port, tmp_path)


def _prometheus_evaluates_everything(worker_port: int, tmp_path: Path) -> None:
    """A real Prometheus scrapes the worker and runs every query and rule without an error."""
    rules = tmp_path / "alerts.yml"
    rules.write_text(ALERTS.read_text())
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "shelfsight-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}],
    }))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 30)
        # Prometheus listens before its storage is up and answers 503 until then: wait for ready.
        wait_for(lambda: _ready(base), timeout=60)

        def query(expr: str) -> dict:
            return json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))

        wait_for(lambda: query('up{job="shelfsight-worker"} == 1')["data"]["result"], timeout=30)
        for item in queries():
            expr = item.expr.replace("${datasource}", "")
            answer = query(expr)
            assert answer["status"] == "success", f"{item.where}: {answer}"
        wait_for(lambda: _rules_evaluated(base), timeout=30)
        groups = json.loads(_get(f"{base}/api/v1/rules"))["data"]["groups"]
        bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not bad, bad
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _ready(base: str) -> bool:
    try:
        with _DIRECT.open(f"{base}/-/ready", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def _rules_evaluated(base: str) -> bool:
    groups = json.loads(_get(f"{base}/api/v1/rules"))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return bool(rules) and all(r["health"] != "unknown" for r in rules)
