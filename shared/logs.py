"""structlog, configured once per process at the entry point."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
_SECRET_KEYS = {"password", "secret", "token", "authorization", "aws_secret_access_key", "basic_auth"}


def redact_url(value: str) -> str:
    """redis://user:pw@host -> redis://user:***@host."""
    return _SECRET_IN_URL.sub(r"\1***@", value)


def _redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if any(s in key.lower() for s in _SECRET_KEYS):
            event_dict[key] = "***"
        elif isinstance(value, str) and "://" in value:
            event_dict[key] = redact_url(value)
    return event_dict


class _CurrentStderr:
    """Writes to whatever sys.stderr is at write time (so redirections, e.g. by pytest, hold)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(log_format: str = "console", level: str = "INFO") -> None:
    """Key-value logs with contextvars (event_id, product_id) merged first; secrets redacted."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper(), force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "PIL", "timm", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
