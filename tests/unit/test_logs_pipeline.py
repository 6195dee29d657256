"""One logging pipeline: structlog, standard-library, Celery and warnings lines, all redacted."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest
import structlog
from pydantic import SecretStr

from shelfsight.shared.logs import configure_logging, redact_text, secret_values
from shelfsight.shared.settings import Settings

SECRET = "hunter2-very-secret"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    hooks = sys.excepthook
    yield
    sys.excepthook = hooks
    configure_logging("console", "INFO")


def _json_lines(err: str) -> list[dict]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # raises if any line is not JSON


def test_every_kind_of_log_line_is_json_and_redacted_after_the_traceback_is_formatted(
    capsys: pytest.CaptureFixture,
) -> None:
    configure_logging("json", "INFO", secrets=[SECRET])
    log = structlog.get_logger()
    try:
        raise ConnectionError(f"AUTH failed for redis://:{SECRET}@10.0.0.1:6379/0 with password={SECRET}")
    except ConnectionError:
        log.exception("structlog.failed")
        logging.getLogger("botocore.foreign").error("stdlib failed", exc_info=True)
    logging.getLogger("some.library").warning("plain %s line, token=abc123def", "stdlib")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated thing used with {SECRET}", UserWarning, stacklevel=1)
    lines = _json_lines(capsys.readouterr().err)
    assert [line["event"].split()[0] for line in lines[:3]] == ["structlog.failed", "stdlib", "plain"]
    assert lines[0]["level"] == "error" and "ConnectionError" in lines[0]["exception"]
    assert lines[1]["logger"] == "botocore.foreign" and "Traceback" in lines[1]["exception"]
    assert "token=***" in lines[2]["event"]
    assert lines[3]["logger"] == "py.warnings"
    text = json.dumps(lines)
    assert SECRET not in text and "abc123def" not in text
    assert "redis://:***@10.0.0.1" in lines[0]["exception"]


def test_settings_secrets_are_known_to_the_redactor(capsys: pytest.CaptureFixture) -> None:
    settings = Settings(broker_url="redis://worker:brokerpass99@redis:6379/0",
                        flower_basic_auth=SecretStr("admin:flower-pass-0123"),
                        s3_secret_access_key=SecretStr("s3-secret-key-xyz"))
    found = secret_values(settings)
    assert {"brokerpass99", "flower-pass-0123", "s3-secret-key-xyz"} <= set(found)
    configure_logging("json", "INFO", secrets=found)
    # secrets that no pattern would recognise: bare, inside ordinary prose
    structlog.get_logger().error("odd", detail="the key s3-secret-key-xyz was rejected",
                                 nested={"list": ["flower-pass-0123"], "aws_secret_access_key": "x"})
    line = _json_lines(capsys.readouterr().err)[-1]
    assert line["detail"] == "the key *** was rejected"
    assert line["nested"] == {"list": ["***"], "aws_secret_access_key": "***"}
    assert redact_text("Authorization: Basic YWRtaW46c2VjcmV0") == "Authorization: Basic ***"


def test_console_mode_redacts_tracebacks_too(capsys: pytest.CaptureFixture) -> None:
    configure_logging("console", "INFO", secrets=[SECRET])
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        structlog.get_logger().exception("failed")
    err = capsys.readouterr().err
    assert "RuntimeError: boom ***" in err and SECRET not in err


def test_celery_per_task_info_lines_are_demoted_and_errors_kept(capsys: pytest.CaptureFixture) -> None:
    configure_logging("json", "INFO")
    assert not logging.getLogger("celery.app.trace").isEnabledFor(logging.INFO)  # Celery does not even build them
    assert not logging.getLogger("celery.worker.strategy").isEnabledFor(logging.INFO)
    logging.getLogger("celery.worker.strategy").info("Task shelfsight.extract[abc] received")
    logging.getLogger("celery.app.trace").info("Task shelfsight.extract[abc] succeeded in 0.1s: {}")
    logging.getLogger("celery.app.trace").error("Task shelfsight.extract[abc] raised unexpected: X")
    logging.getLogger("celery.worker.consumer").info("Connected to redis://:**@127.0.0.1:6379/0")
    lines = _json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == [
        "Task shelfsight.extract[abc] raised unexpected: X", "Connected to redis://:***@127.0.0.1:6379/0"]
    configure_logging("json", "DEBUG")
    assert logging.getLogger("celery.app.trace").isEnabledFor(logging.DEBUG)
    logging.getLogger("celery.app.trace").info("Task shelfsight.extract[abc] succeeded in 0.1s: {}")
    assert _json_lines(capsys.readouterr().err)[-1]["level"] == "debug"


def test_celery_leaves_logging_and_stdio_alone(capsys: pytest.CaptureFixture) -> None:
    from celery import Celery

    configure_logging("json", "INFO")
    root_handlers = list(logging.getLogger().handlers)
    stdout, stderr = sys.stdout, sys.stderr
    app = Celery("logs-test", set_as_current=False)
    app.log.already_setup = False
    app.log.setup(loglevel="INFO", redirect_stdouts=True)
    assert sys.stdout is stdout and sys.stderr is stderr  # no LoggingProxy
    assert logging.getLogger().handlers == root_handlers
    assert not [h for h in logging.getLogger("celery.task").handlers if not isinstance(h, logging.NullHandler)]
    from celery.utils.log import get_task_logger

    get_task_logger("shelfsight.test").warning("from a task logger")
    assert _json_lines(capsys.readouterr().err)[-1]["event"] == "from a task logger"


def test_uncaught_exceptions_become_redacted_log_lines(capsys: pytest.CaptureFixture) -> None:
    configure_logging("json", "INFO", secrets=[SECRET])
    try:
        raise ValueError(SECRET)
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    line = _json_lines(capsys.readouterr().err)[-1]
    assert line["event"] == "uncaught_exception" and "ValueError: ***" in line["exception"]


def test_lines_logged_from_many_threads_at_once_stay_whole_and_each_keeps_its_own_context(
    capsys: pytest.CaptureFixture,
) -> None:
    """The handler renders outside its lock (RenderFirstHandler) and writes under it: 8 task
    threads x 50 lines come out as 400 whole JSON lines, each with its own thread's event_id."""
    import threading

    configure_logging("json", "INFO")
    log = structlog.get_logger()
    start = threading.Barrier(8)

    def work(n: int) -> None:
        structlog.contextvars.bind_contextvars(event_id=f"ev-{n}")
        start.wait()
        for i in range(50):
            log.info("event.done", n=n, i=i, padding="x" * 500)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = [line for line in _json_lines(capsys.readouterr().err) if line["event"] == "event.done"]
    assert len(lines) == 400
    assert all(line["event_id"] == f"ev-{line['n']}" for line in lines)
    assert sorted((line["n"], line["i"]) for line in lines) == [(n, i) for n in range(8) for i in range(50)]


def test_a_line_that_cannot_be_rendered_is_reported_not_raised(capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("json", "INFO")
    handler = next(h for h in logging.getLogger().handlers if h.get_name() == "shelfsight")

    def broken(record: logging.LogRecord) -> str:
        raise ValueError("renderer broke")

    monkeypatch.setattr(handler, "format", broken)
    monkeypatch.setattr(logging, "raiseExceptions", True)
    logging.getLogger("x").warning("this line")  # must not raise into the caller
    assert "renderer broke" in capsys.readouterr().err  # logging's own report of a handler error
