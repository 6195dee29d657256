"""Least privilege as shipped: IAM policies per role, compose users, no default secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from shelfsight.shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]
IAM = REPO / "docker" / "iam"
COMPOSE = REPO / "docker" / "compose.yaml"
BUCKET = "arn:aws:s3:::shelfsight"


def _grants(role: str) -> dict[str, set[str]]:
    """action -> object prefixes (or the bucket itself) the role's policy allows."""
    policy = json.loads((IAM / f"{role}.json").read_text())
    assert policy["Version"] == "2012-10-17"
    grants: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in statement["Action"]:
            assert "*" not in action, f"{role}: wildcard action {action}"
            for resource in statement["Resource"]:
                assert resource == BUCKET or resource.startswith(BUCKET + "/"), resource
                grants.setdefault(action, set()).add(resource.removeprefix(BUCKET + "/"))
    return grants


def _prefixes() -> dict[str, str]:
    s = Settings()
    return {"models": s.models_prefix, "results": s.results_prefix, "dead-letters": s.dead_letter_prefix,
            "labels": s.labels_prefix}


def test_policies_name_the_settings_prefixes() -> None:
    assert _prefixes() == {"models": "models", "results": "results", "dead-letters": "dead-letters",
                           "labels": "labels"}


@pytest.mark.parametrize(("role", "reads", "writes"), [
    ("worker", {"uploads/*", "models/*", "results/*"}, {"results/*", "dead-letters/*"}),
    ("trainer", {"uploads/*", "labels/*", "models/*"}, {"labels/*", "models/*"}),
    ("enqueuer", set(), {"dead-letters/*"}),
    ("labeler", {"uploads/*"}, {"labels/*"}),
])
def test_each_role_reads_and_writes_exactly_its_prefixes(role: str, reads: set[str], writes: set[str]) -> None:
    grants = _grants(role)
    assert grants.get("s3:GetObject", set()) == reads
    assert grants.get("s3:PutObject", set()) == writes
    assert set(grants) <= {"s3:GetObject", "s3:PutObject", "s3:ListBucket"}  # no delete, no admin
    assert grants.get("s3:ListBucket", {BUCKET}) == {BUCKET}


def test_no_role_but_the_trainer_can_write_the_model_registry() -> None:
    writers = {role.stem for role in IAM.glob("*.json") if "models/*" in _grants(role.stem).get("s3:PutObject", set())}
    assert writers == {"trainer"}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return {k: str(v) for k, v in env.items()}


def test_compose_has_no_default_secrets() -> None:
    text = COMPOSE.read_text()
    for var in ("REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "WORKER_S3_SECRET_KEY", "TRAINER_S3_SECRET_KEY",
                "ENQUEUER_S3_SECRET_KEY", "SHELFSIGHT_MODEL_SIGNING_KEY", "SHELFSIGHT_FLOWER_BASIC_AUTH"):
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses, var
        assert all(use.startswith(":?") for use in uses), f"{var} has a default: {uses}"
    assert "shelfsight-secret" not in text and "admin:shelfsight" not in text


def test_compose_gives_each_service_its_own_s3_user_and_flower_none() -> None:
    services = _compose()["services"]
    keys = {name: _env(services[name]).get("SHELFSIGHT_S3_ACCESS_KEY_ID") for name in ("worker", "trainer", "cli")}
    assert keys == {"worker": "${WORKER_S3_ACCESS_KEY:-shelfsight-worker}",
                    "trainer": "${TRAINER_S3_ACCESS_KEY:-shelfsight-trainer}",
                    "cli": "${ENQUEUER_S3_ACCESS_KEY:-shelfsight-enqueuer}"}
    assert "SHELFSIGHT_S3_SECRET_ACCESS_KEY" not in _env(services["flower"])
    for name in ("worker", "trainer", "flower", "cli"):
        assert "MINIO_ROOT" not in json.dumps(_env(services[name]))
    init = services["minio-init"]
    assert "./iam:/iam:ro" in init["volumes"]
    script = init["command"][0]
    for role in ("worker", "trainer", "enqueuer"):
        assert f"grant {role} " in script and (IAM / f"{role}.json").exists()
    assert "mc admin policy create" in script and "mc admin policy attach" in script


def test_compose_redis_needs_a_password_everywhere() -> None:
    services = _compose()["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--user default off" in redis_cmd and '">$$REDIS_PASSWORD"' in redis_cmd
    for name in ("worker", "trainer", "flower", "cli"):
        env = _env(services[name])
        for var in ("SHELFSIGHT_BROKER_URL", "SHELFSIGHT_RESULT_BACKEND"):
            assert env[var].startswith("redis://shelfsight:${REDIS_PASSWORD:?"), (name, var)
    assert _env(services["minio"])["MINIO_NOTIFY_REDIS_PASSWORD_PRIMARY"].startswith("${REDIS_PASSWORD:?")
