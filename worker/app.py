"""Composition root for `celery -A worker.app`: Settings built once, logging configured once."""

from shared.logs import configure_logging
from shared.settings import Settings
from worker.celery_app import create_celery_app

settings = Settings()
configure_logging(settings.log_format, settings.log_level)
app = create_celery_app(settings)
