"""Helpers of the relay's integration tests: the extract queue's event ids, an SQS queue on moto."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import boto3
import redis

from shelfsight.shared.settings import Settings


def queued_event_ids(settings: Settings) -> list[str]:
    """Event ids of the messages waiting in the extract queue (payload ids, checked against the task id)."""
    client = redis.Redis.from_url(settings.broker_url)
    ids = []
    for raw in client.lrange(settings.extract_queue, 0, -1):  # type: ignore[union-attr]
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        assert message["headers"]["id"] == args[0]["event_id"], "task id is the event id"
        ids.append(args[0]["event_id"])
    return ids


def sqs(settings: Settings) -> Any:
    return boto3.client("sqs", endpoint_url=settings.sqs_endpoint_url, region_name=settings.sqs_region,
                        aws_access_key_id="test", aws_secret_access_key="test")


def new_queue(settings: Settings, visibility_timeout_s: int = 30) -> str:
    name = f"uploads-{uuid.uuid4().hex[:8]}"
    return str(sqs(settings).create_queue(
        QueueName=name, Attributes={"VisibilityTimeout": str(visibility_timeout_s)})["QueueUrl"])


def sqs_counts(settings: Settings, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages of the queue."""
    attributes = sqs(settings).get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])
