"""Logging: secrets never reach a log line."""

from __future__ import annotations

import json
import sys

import pytest
import structlog

from shelfsight.shared.logs import configure_logging, redact_url


def test_secrets_are_redacted_from_logs(capsys: pytest.CaptureFixture) -> None:
    """(Runs in JSON mode, then hands the process back in console mode, as the other tests expect.)"""
    hooks = sys.excepthook
    try:
        _check_redaction(capsys)
    finally:
        sys.excepthook = hooks
        configure_logging("console", "INFO")


def _check_redaction(capsys: pytest.CaptureFixture) -> None:
    assert redact_url("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    configure_logging("json", "INFO")
    structlog.get_logger().info("connect", broker="redis://:hunter2@10.0.0.1:6379/0",
                                aws_secret_access_key="AKIA-SECRET", basic_auth="admin:pw", product_id="p1")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "hunter2" not in json.dumps(line) and "AKIA-SECRET" not in json.dumps(line)
    assert line["basic_auth"] == "***" and line["product_id"] == "p1"
