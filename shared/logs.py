"""Logging: one pipeline for every log line of a process, configured once at the entry point.

structlog events, standard-library records (boto3, Celery, Flower, tornado, PIL, …) and Python
warnings all end in one handler whose `structlog.stdlib.ProcessorFormatter` renders them the
same way: JSON lines in JSON mode, key-value text otherwise. Redaction is the formatter's last
step before rendering, so it sees the finished line, formatted tracebacks included: a secret in
an exception message is redacted like a secret in a field.

Celery is told not to set up logging of its own (no second handler, no stdout redirection),
and its per-task INFO lines ("Task … received", "… succeeded in …") are demoted to DEBUG.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import structlog
from pydantic import SecretStr

REDACTED = "***"
_SECRET_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
_SECRET_KEYS = ("password", "passwd", "secret", "token", "authorization", "basic_auth",
                "signing_key", "credential", "api_key", "apikey")
# key=value / key: value pairs in free text (exception messages, foreign log lines).
_SECRET_PAIR = re.compile(
    r"(?i)\b((?:[a-z0-9]+[_-])*(?:password|passwd|secret|token|api[_-]?key|signing[_-]key)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&)}\]]+)"
)
_BASIC_AUTH = re.compile(r"(?i)\b(basic\s+)[a-z0-9+/=]{8,}")
# Text that none of the three patterns above could change: no "://", no secret word, no "basic" +
# space. One search instead of three substitutions for the ids, names and values most fields hold.
_MAYBE_SECRET = re.compile(r"(?i)://|pass(?:word|wd)|secret|token|api[_-]?key|signing[_-]key|basic\s")
_SECRET_KEY = re.compile("|".join(_SECRET_KEYS))
_MIN_SECRET_LEN = 4  # shorter "secrets" would redact ordinary words

# Celery's per-task chatter: one INFO line per message received and per task finished.
_TASK_CHATTER = ("celery.app.trace", "celery.worker.strategy")

_known_secrets: tuple[str, ...] = ()


def redact_url(value: str) -> str:
    """redis://user:pw@host -> redis://user:***@host."""
    return _SECRET_IN_URL.sub(r"\1***@", value)


def redact_text(value: str) -> str:
    """Free text with every secret this process knows, URL passwords and `password=…` pairs masked."""
    for secret in _known_secrets:
        if secret in value:
            value = value.replace(secret, REDACTED)
    if _MAYBE_SECRET.search(value) is None:
        return value
    value = _SECRET_IN_URL.sub(r"\1***@", value)
    value = _SECRET_PAIR.sub(rf"\1{REDACTED}", value)
    return _BASIC_AUTH.sub(rf"\1{REDACTED}", value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _secret_key_name(key: str) -> bool:
    return _SECRET_KEY.search(key.lower()) is not None


def _secret_key(key: object) -> bool:
    # field names come from a small set: remembered (the lowercase scan ran 10 times per field)
    return isinstance(key, str) and _secret_key_name(key)


def _redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last processor before rendering: runs on formatted exceptions too."""
    for key, value in list(event_dict.items()):
        event_dict[key] = REDACTED if _secret_key(key) and key != "event" else _redact_value(value)
    return event_dict


def secret_values(settings: Any) -> list[str]:
    """Every secret a Settings object holds: SecretStr values, their `user:password` halves, URL passwords.

    Registered with `configure_logging(secrets=...)`, each is masked wherever it appears in a
    log line, even inside a message or a traceback that no pattern would recognise.
    """
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
            found.append(text)
            for part in text.split(","):
                found.append(part.partition(":")[2])  # user:password (Flower basic auth)
        elif isinstance(value, str) and "://" in value:
            match = re.search(r"://[^:/@\s]*:([^@\s]+)@", value)
            if match:
                found.append(match.group(1))
    return sorted({s for s in found if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)


class _CurrentStderr:
    """Writes to whatever sys.stderr is at write time (so redirections, e.g. by pytest, hold)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _DemoteTaskChatter(logging.Filter):
    """Celery's per-task INFO lines become DEBUG (and are dropped unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.startswith(_TASK_CHATTER):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class RenderFirstHandler(logging.StreamHandler):
    """A StreamHandler that renders a record before it takes the handler's lock, so only the
    write is serialised: the extraction worker's task threads each log a line per event, and
    queued on the lock for the whole render (processors, redaction, JSON) of every other line.
    The formatter keeps no state between records, so rendering in parallel is safe."""

    def handle(self, record: logging.LogRecord) -> bool:
        passed = self.filter(record)
        if not passed:
            return False
        if isinstance(passed, logging.LogRecord):  # Python 3.12: a filter may return a replacement
            record = passed
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - as emit does: report, never raise into the caller
            self.handleError(record)
            return True
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line)
                self.flush()
            except Exception:  # noqa: BLE001
                self.handleError(record)
        return True


def _renderer(log_format: str) -> Any:
    if log_format == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)


def build_handler(log_format: str = "console") -> logging.Handler:
    """The one handler: every record, structlog's or not, rendered by ProcessorFormatter."""
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # tracebacks become text first ...
            _redact,                               # ... so redaction covers them
            _renderer(log_format),
        ],
    )
    handler = RenderFirstHandler(_CurrentStderr())
    handler.setFormatter(formatter)
    handler.addFilter(_DemoteTaskChatter())
    handler.set_name("shelfsight")
    return handler


def configure_logging(log_format: str = "console", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Route structlog, standard-library, Celery and warnings logs through one redacting handler.

    Args:
        log_format: "json" (one JSON object per line) or "console" (key-value text).
        level: the root level; Celery's per-task INFO lines only show at DEBUG.
        secrets: values to mask wherever they appear (see `secret_values(settings)`).
    """
    global _known_secrets
    _known_secrets = tuple(sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True))
    numeric = logging.getLevelName(level.upper())
    root = logging.getLogger()
    for old in list(root.handlers):
        if not type(old).__module__.startswith("_pytest"):  # keep pytest's capture handlers
            root.removeHandler(old)
    root.addHandler(build_handler(log_format))
    root.setLevel(numeric)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "PIL", "timm", "matplotlib", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Celery asks once, when it builds a task's strategy and tracer, whether its per-task INFO lines
    # are wanted (`isEnabledFor(INFO)`). Above DEBUG they are never shown, so they are not made
    # either (two records per message, built and then dropped by _DemoteTaskChatter).
    for chatter in _TASK_CHATTER:
        logging.getLogger(chatter).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn(...) output becomes a log line too
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    _keep_celery_off_logging(json_lines=log_format == "json")
    _log_uncaught_exceptions()


def _celery_setup_logging(**_: Any) -> None:
    """Receiver of Celery's setup_logging signal: its presence tells Celery to leave logging alone."""


def _keep_celery_off_logging(json_lines: bool) -> None:
    # With a receiver connected, Celery adds no handler of its own (not even to its task logger)
    # and does not redirect stdout/stderr into a logger.
    from celery.signals import celeryd_init, setup_logging

    setup_logging.connect(_celery_setup_logging, weak=False, dispatch_uid="shelfsight.logs")
    if json_lines:
        celeryd_init.connect(_json_celery_says, weak=False, dispatch_uid="shelfsight.logs.say")
    else:
        celeryd_init.disconnect(dispatch_uid="shelfsight.logs.say")


def _json_celery_says(**_: Any) -> None:
    """In JSON mode, the few lines a Celery worker writes outside logging (from its signal
    handlers: "worker: Warm shutdown (MainProcess)") become JSON lines too."""
    import celery.apps.worker as celery_worker

    def say(msg: str, f: Any = sys.__stderr__) -> None:
        line = json.dumps({"event": "celery.worker_said", "message": redact_text(str(msg).strip()),
                           "level": "warning", "logger": "celery.apps.worker",
                           "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")})
        with contextlib.suppress(OSError, AttributeError, ValueError):  # a plain write, as Celery's own
            os.write(f.fileno(), (line + "\n").encode())

    celery_worker.safe_say = say


def _log_uncaught_exceptions() -> None:
    """Uncaught exceptions (main thread and others) become log lines, redacted, not raw tracebacks."""
    log = structlog.get_logger("shelfsight.uncaught")

    def main_hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
        log.critical("uncaught_exception", thread=getattr(args.thread, "name", None), exc_info=exc_info)

    sys.excepthook = main_hook
    threading.excepthook = thread_hook
