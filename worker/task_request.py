"""The extract task's Celery request: every monitoring event but `task-started`.

Each extract message costs three task events (received, started, succeeded), each a JSON
document published to Redis by the worker, about a tenth of a millisecond of CPU apiece. Flower
needs `task-received` (its Processed count and the task list), `task-succeeded`/`task-failed`/
`task-retried` (outcomes, runtime) and the worker heartbeats (online, active, load); `started`
only adds a timestamp to each task's page and Flower's prefetch-time histogram. So extraction
drops it, and keeps the rest. Training tasks keep Celery's request and every event.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

SKIPPED_EVENTS = frozenset({"task-started"})


class ExtractRequest(Request):
    """Celery's Request, minus the events in SKIPPED_EVENTS."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type in SKIPPED_EVENTS:
            return
        super().send_event(type, **fields)
