"""Training triggers: the per-category training lock and enqueueing a training run.

Producers (the CLI, label import, Celery beat, the demo) and the trainer both use this, so it
lives on the ground floor: triggering a training never loads the trainer.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis
import structlog
from celery import Celery

from shelfsight.shared.celery_app import TRAIN_TASK, settings_of
from shelfsight.shared.enqueue import ENQUEUED_AT_HEADER
from shelfsight.shared.taxonomy import Taxonomy

log = structlog.get_logger()

# Take the lock for `owner`, or confirm `owner` already holds it (refreshing the TTL).
# Returns the holder: == owner means we hold it.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
return holder
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# An execution claims the lock its task id holds (pending since enqueue) with a token of its own,
# "<task id>#<token>", or refreshes it. A redelivered copy of the same task (same id, another
# token) finds the first execution's token and is turned away. Returns the holder.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] or holder == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return ARGV[2]
end
return holder
"""
EXECUTION_SEPARATOR = "#"


def lock_key(category: str) -> str:
    return f"shelfsight:train-lock:{category}"


def _task_id(holder: str) -> str:
    """The task id part of a lock value ("<task id>" pending, "<task id>#<token>" running)."""
    return holder.split(EXECUTION_SEPARATOR, 1)[0]


def acquire_training_lock(client: redis.Redis, category: str, owner: str, ttl_s: int) -> str | None:
    """None if `owner` now holds the category's training lock, else the task id of the holder."""
    holder = client.eval(_ACQUIRE, 1, lock_key(category), owner, ttl_s)
    holder = holder.decode() if isinstance(holder, bytes) else str(holder)
    return None if holder == owner else _task_id(holder)


def execution_lock_value(task_id: str, token: str) -> str:
    return f"{task_id}{EXECUTION_SEPARATOR}{token}"


def claim_training_lock(client: redis.Redis, category: str, task_id: str, token: str, ttl_s: int) -> str | None:
    """None if this execution (task id + its own token) now holds the lock, claimed or refreshed;
    else the holder's lock value (another task, or another execution of the same task)."""
    value = execution_lock_value(task_id, token)
    holder = client.eval(_CLAIM, 1, lock_key(category), task_id, value, ttl_s)
    holder = holder.decode() if isinstance(holder, bytes) else str(holder)
    return None if holder == value else holder


def holds_training_lock(client: redis.Redis, category: str, value: str) -> bool:
    """Whether the lock's value is still exactly `value` (an owner, or an execution's lock value)."""
    current = client.get(lock_key(category))
    return (current.decode() if isinstance(current, bytes) else current) == value


def release_training_lock(client: redis.Redis, category: str, owner: str) -> bool:
    """Release the lock if `owner` holds it."""
    return bool(client.eval(_RELEASE, 1, lock_key(category), owner))


def training_lock_holder(client: redis.Redis, category: str) -> str | None:
    """The task id holding the category's training lock, or None."""
    value = client.get(lock_key(category))
    holder = value.decode() if isinstance(value, bytes) else value
    return None if holder is None else _task_id(holder)


@dataclass(frozen=True)
class Enqueued:
    """`queued` False means a training was already queued or running: task_id is that one."""

    category: str
    task_id: str
    queued: bool


def enqueue_training(
    app: Celery, client: redis.Redis, taxonomy: Taxonomy, category: str, *,
    caption_template: str | None = None, reason: str = "",
) -> Enqueued:
    """Enqueue a training of `category` unless one is already queued or running for it.

    The lock is taken for the new task id before the message is sent, so two triggers racing
    enqueue one run; the second gets the first one's task id back. Raises KeyError (naming the
    known categories) for a category the taxonomy does not have.
    """
    taxonomy.category(category)
    settings = settings_of(app)
    task_id = uuid.uuid4().hex
    holder = acquire_training_lock(client, category, task_id, settings.training_lock_ttl_s)
    if holder is not None:
        log.info("train.already_pending", category=category, task_id=holder, reason=reason)
        return Enqueued(category, holder, queued=False)
    try:
        app.send_task(
            TRAIN_TASK, args=[category], kwargs={"caption_template": caption_template},
            task_id=task_id, queue=settings.training_queue,
            headers={ENQUEUED_AT_HEADER: time.time()},  # for the queue-age metric
        )
    except Exception:
        release_training_lock(client, category, task_id)
        raise
    log.info("train.enqueued", category=category, task_id=task_id, reason=reason)
    return Enqueued(category, task_id, queued=True)
