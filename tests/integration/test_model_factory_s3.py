"""The model factory reads s3:// weights from a real S3 endpoint (moto server)."""

from __future__ import annotations

import pytest
from safetensors.torch import save as save_safetensors

from shelfsight.shared.model_factory import WeightsError, create_clip, sha256_bytes
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import TINY_ARCH, assert_weights_loaded, distinct_tiny_weights


def test_s3_uri(store: S3ObjectStore, settings: Settings) -> None:
    state = distinct_tiny_weights(4)
    data = save_safetensors(state)
    store.put(settings.bucket, "models/base/tiny.safetensors", data, "application/octet-stream")
    uri = f"s3://{settings.bucket}/models/base/tiny.safetensors"
    bundle = create_clip(TINY_ARCH, uri, store=store, expected_sha256=sha256_bytes(data))
    assert_weights_loaded(bundle, state)
    with pytest.raises(WeightsError, match="cannot fetch"):
        create_clip(TINY_ARCH, f"s3://{settings.bucket}/models/base/missing.safetensors", store=store)
