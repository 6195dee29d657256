"""Composition root for `celery --app shelfsight.shared.control ...` commands run by hand.

    celery --app shelfsight.shared.control inspect ping -d extract@host

A producer app (no task modules), built once from the environment on first access.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.settings import Settings


@cache
def _app() -> Celery:
    return create_celery_app(Settings())


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app()
    raise AttributeError(name)
