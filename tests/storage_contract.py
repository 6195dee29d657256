"""What every ObjectStore must do, run against the in-memory fake (unit) and S3 (integration)."""

from __future__ import annotations

import pytest

from shelfsight.shared.storage import ObjectMissing, ObjectStore, ObjectTooLarge, PreconditionFailed


def check_put_get_list_delete(store: ObjectStore, bucket: str) -> None:
    etag = store.put(bucket, "a/1.json", b"{}")
    store.put(bucket, "a/2.json", b"[]")
    store.put(bucket, "b/3.json", b"0")
    got = store.get(bucket, "a/1.json")
    assert got.body == b"{}" and got.etag == etag
    assert store.list_keys(bucket, "a/") == ["a/1.json", "a/2.json"]
    assert store.exists(bucket, "b/3.json") and not store.exists(bucket, "b/4.json")
    store.delete(bucket, "b/3.json")
    with pytest.raises(ObjectMissing):
        store.get(bucket, "b/3.json")
    with pytest.raises(ObjectTooLarge):
        store.get(bucket, "a/1.json", max_bytes=1)


def check_conditional_writes(store: ObjectStore, bucket: str) -> None:
    first = store.put(bucket, "r.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put(bucket, "r.json", b"2", if_none_match=True)  # exists
    second = store.put(bucket, "r.json", b"3", if_match=first)  # unchanged since we read it
    with pytest.raises(PreconditionFailed):
        store.put(bucket, "r.json", b"4", if_match=first)  # changed by someone else
    assert store.get(bucket, "r.json").body == b"3" and store.get(bucket, "r.json").etag == second
