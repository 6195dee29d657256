"""One upload flows through the relay with no enqueue call (what `make demo` shows), and the dev
stack runs the relay and points SHELFSIGHT_SQS_ENDPOINT_URL at its moto server."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import redis

from shelfsight.shared.dev.stack import start_stack
from shelfsight.shared.enqueue import events_from_s3_notification
from shelfsight.shared.relay.demo import UPLOADS_LIST, minio_put_notification, upload_through_relay
from shelfsight.shared.relay.runner import redis_list_source
from shelfsight.shared.settings import Settings
from tests.helpers import extraction_worker, jpeg_bytes, wait_for
from tests.integration.relay_helpers import queued_event_ids
from tests.integration.test_relay import RunningRelay


def test_an_upload_becomes_a_result_through_the_relay(settings: Settings) -> None:
    s = settings.model_copy(update={"relay_poll_wait_s": 0.5})
    with extraction_worker(s), RunningRelay(s, redis_list_source(s, UPLOADS_LIST)):
        result = upload_through_relay(s, "uploads/tops/relayed-1.jpg", jpeg_bytes(), timeout_s=90)
    assert result["product_id"] == "relayed-1" and result["category"] == "tops"
    assert result["event_id"].startswith("s3-") and result["attributes"]
    assert redis.Redis.from_url(s.broker_url).llen(UPLOADS_LIST + ":processing") == 0


def test_dev_stack_runs_the_relay_and_exports_its_sqs_endpoint(tmp_path: Path) -> None:
    base = Settings(relay_poll_wait_s=0.5)
    with start_stack(tmp_path / "dev", base, worker=False, flower=False, relay=True,
                     extra_env={"SHELFSIGHT_RELAY_POLL_WAIT_S": "0.5"}) as stack:
        env = stack.env
        assert env["SHELFSIGHT_SQS_ENDPOINT_URL"] == env["SHELFSIGHT_S3_ENDPOINT_URL"]
        settings = stack.client_settings(base)
        assert settings.sqs_endpoint_url == env["SHELFSIGHT_SQS_ENDPOINT_URL"]
        sqs = boto3.client("sqs", endpoint_url=settings.sqs_endpoint_url, region_name="us-east-1",
                           aws_access_key_id="test", aws_secret_access_key="test")
        assert sqs.create_queue(QueueName="uploads")["QueueUrl"]  # moto speaks SQS on that endpoint

        item = minio_put_notification(stack.bucket, "uploads/pans/p7.jpg", 1234, "abc")
        [event] = events_from_s3_notification({"Records": json.loads(item)[0]["Event"]},
                                              settings.s3_notification_key_pattern)
        redis.Redis.from_url(settings.broker_url).rpush(UPLOADS_LIST, item)
        wait_for(lambda: queued_event_ids(settings) == [event.event_id], timeout=30)
