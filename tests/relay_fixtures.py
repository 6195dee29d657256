"""Storage notifications as S3, SNS, EventBridge and MinIO send them (for the relay's tests)."""

from __future__ import annotations

import json
from typing import Any


def s3_record(bucket: str, key: str, sequencer: str, name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """One S3 event record (MinIO's are the same, with `s3:` before the event name)."""
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-27T10:00:00.000Z", "eventName": name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": key, "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                          "sequencer": sequencer}},
    }


def s3_notification(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def sns_envelope(notification: dict[str, Any]) -> dict[str, Any]:
    """SNS -> SQS without raw message delivery: the S3 JSON is a string in `Message`."""
    return {"Type": "Notification", "MessageId": "6f1e", "TopicArn": "arn:aws:sns:us-east-1:1:uploads",
            "Subject": "Amazon S3 Notification", "Message": json.dumps(notification),
            "Timestamp": "2026-11-27T10:00:00.000Z"}


def eventbridge_event(bucket: str, key: str, sequencer: str) -> dict[str, Any]:
    """EventBridge -> SQS: an `Object Created` event."""
    return {
        "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": "Object Created",
        "source": "aws.s3", "account": "123456789012", "time": "2026-11-27T10:00:00Z",
        "region": "us-east-1", "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {"version": "0", "bucket": {"name": bucket},
                   "object": {"key": key, "size": 1024, "etag": "d41d8cd98f00b204e9800998ecf8427e",
                              "sequencer": sequencer},
                   "request-id": "N4N7GDK58NMKJ12R", "requester": "123456789012", "reason": "PutObject"},
    }


def s3_test_event() -> dict[str, Any]:
    """What S3 sends once when a notification is configured."""
    return {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-27T10:00:00.000Z",
            "Bucket": "uploads", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw"}


def minio_list_item(*records: dict[str, Any]) -> str:
    """One item MinIO's Redis target (format `access`) RPUSHes: a list of {Event, EventTime}."""
    minio = [dict(r, eventName="s3:" + r["eventName"]) for r in records]
    return json.dumps([{"Event": minio, "EventTime": "2026-11-27T10:00:00.000Z"}])
