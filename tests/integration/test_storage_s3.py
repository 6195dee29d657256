"""The S3 object store against a real S3 endpoint (moto server): the same contract as the fake."""

from __future__ import annotations

from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.storage_contract import check_conditional_writes, check_put_get_list_delete


def test_put_get_list_delete(store: S3ObjectStore, settings: Settings) -> None:
    check_put_get_list_delete(store, settings.bucket)


def test_conditional_writes(store: S3ObjectStore, settings: Settings) -> None:
    check_conditional_writes(store, settings.bucket)
