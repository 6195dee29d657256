"""Signed manifests, and the checks a worker makes on every manifest whether or not it has a key."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from shelfsight.shared.model_signing import (
    ManifestRefused,
    ManifestSignatureError,
    check_manifest,
    load_trusted_manifest,
    sign_manifest,
    verify_signature,
)
from shelfsight.shared.registry import Manifest, ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import Taxonomy, load_taxonomy

KEY = SecretStr("signing-key-for-tests-0123456789")
ARCH = "shelfsight-tiny"


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy(Settings().taxonomy_path)


def _manifest(taxonomy: Taxonomy, category: str = "pans", version: str = "v1", **changes: object) -> Manifest:
    cat = taxonomy.category(category)
    fields: dict = dict(
        category=category, version=version, architecture=ARCH, base_weights="none",
        taxonomy_version=taxonomy.version, values={n: a.value_names for n, a in cat.attributes.items()},
        captions={n: a.captions() for n, a in cat.attributes.items()}, weights_sha256="ab" * 32,
        weights_bytes=10,
    )
    fields.update(changes)
    return Manifest(**fields)


def _stored(manifest: Manifest) -> dict:
    return json.loads(manifest.model_dump_json(indent=2))  # what a worker reads back from S3


def test_signature_verifies_and_covers_every_field(taxonomy: Taxonomy) -> None:
    signed = sign_manifest(_manifest(taxonomy), KEY)
    assert signed.signature and signed.signature.startswith("hmac-sha256:")
    verify_signature(_stored(signed), KEY)
    for field, value in [("weights_sha256", "cd" * 32), ("architecture", "ViT-B-32"),
                         ("captions", {"lid": ["evil", "x"], "handle": ["a", "b"]}), ("metrics", {"x": 1})]:
        tampered = _stored(signed)
        tampered[field] = value
        with pytest.raises(ManifestSignatureError, match="does not match"):
            verify_signature(tampered, KEY)


def test_unsigned_or_foreign_key_manifests_are_refused(taxonomy: Taxonomy) -> None:
    with pytest.raises(ManifestSignatureError, match="unsigned"):
        verify_signature(_stored(_manifest(taxonomy)), KEY)
    with pytest.raises(ManifestSignatureError, match="does not match"):
        verify_signature(_stored(sign_manifest(_manifest(taxonomy), "another-key-entirely-000")), KEY)


@pytest.mark.parametrize(("changes", "match"), [
    ({"category": "tops"}, "does not match its path"),
    ({"version": "v2"}, "does not match its path"),
    ({"architecture": "hf-hub:evil/model"}, "not allowed"),
    ({"architecture": "local-dir:/tmp/model"}, "not allowed"),
    ({"architecture": "../../etc/model"}, "not allowed"),
    ({"architecture": "ViT-B-32"}, "not allowed"),                       # a real name, but not on the allowlist
    ({"values": {"lid": ["yes", "no", "maybe"], "handle": ["yes", "no"]}}, "differ from this worker's taxonomy"),
    ({"values": {"lid": ["yes", "no"]}, "captions": {"lid": ["a", "b"]}}, "differ from this worker's taxonomy"),
    ({"captions": {"lid": ["a"], "handle": ["a", "b"]}}, "one caption per value"),
    ({"captions": {"lid": ["a", "x" * 600], "handle": ["a", "b"]}}, "over-long caption"),
])
def test_manifest_checks_without_a_key(taxonomy: Taxonomy, changes: dict, match: str) -> None:
    manifest = _manifest(taxonomy, **changes)
    with pytest.raises(ManifestRefused, match=match):
        check_manifest(manifest, category="pans", version="v1", taxonomy=taxonomy, architectures={ARCH})


def test_value_order_may_differ_and_taxonomy_version_alone_is_a_note(taxonomy: Taxonomy) -> None:
    manifest = _manifest(taxonomy, taxonomy_version="older",
                         values={"lid": ["no", "yes"], "handle": ["yes", "no"]})
    notes = check_manifest(manifest, category="pans", version="v1", taxonomy=taxonomy, architectures={ARCH})
    assert notes and "identical" in notes[0]


def test_load_trusted_manifest_reads_raw_bytes_and_applies_both(taxonomy: Taxonomy) -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, "shelfsight")
    settings = Settings(model_arch=ARCH, model_signing_key=KEY)
    registry.upload_version(sign_manifest(_manifest(taxonomy), KEY), b"weights")
    manifest, notes = load_trusted_manifest(registry, "pans", "v1", taxonomy=taxonomy, settings=settings)
    assert manifest.version == "v1" and notes == []
    registry.upload_version(_manifest(taxonomy, version="v2"), b"weights")  # unsigned
    with pytest.raises(ManifestSignatureError):
        load_trusted_manifest(registry, "pans", "v2", taxonomy=taxonomy, settings=settings)
    unsigned_ok = Settings(model_arch=ARCH)  # no key: signatures are not required
    assert load_trusted_manifest(registry, "pans", "v2", taxonomy=taxonomy, settings=unsigned_ok)[0].version == "v2"
    store.put("shelfsight", "models/pans/v3/manifest.json", b"[1, 2]")
    with pytest.raises(ManifestRefused, match="not a JSON object"):
        load_trusted_manifest(registry, "pans", "v3", taxonomy=taxonomy, settings=unsigned_ok)


def _publish(settings: Settings, store: InMemoryObjectStore, taxonomy: Taxonomy, seed: int,
             key: SecretStr | str | None, **changes: object) -> str:
    """Upload a distinct tiny checkpoint as a new version (signed with `key`, if any) and promote it."""
    import torch
    from safetensors.torch import save as save_safetensors

    from shelfsight.shared.model_factory import create_clip, sha256_bytes
    from shelfsight.shared.registry import new_version

    state = {k: v.detach().clone().contiguous() for k, v in create_clip(ARCH, "none").model.state_dict().items()}
    state["visual.proj"] += torch.randn(state["visual.proj"].shape, generator=torch.Generator().manual_seed(seed))
    weights = save_safetensors(state)
    version = new_version()
    manifest = _manifest(taxonomy, version=version, weights_sha256=sha256_bytes(weights),
                         weights_bytes=len(weights), **changes)
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    registry.upload_version(sign_manifest(manifest, key) if key else manifest, weights)
    registry.promote("pans", version, reason="test")
    return version


def test_worker_refuses_a_mis_signed_manifest_and_keeps_serving_the_previous_version(taxonomy: Taxonomy) -> None:
    from prometheus_client import REGISTRY

    from shelfsight.worker.model_cache import ModelCache

    settings = Settings(model_arch=ARCH, model_weights="none", device="cpu", model_signing_key=KEY)
    store = InMemoryObjectStore()
    cache = ModelCache(settings, taxonomy, store, ModelRegistry(store, settings.bucket))

    def failures() -> float:
        return REGISTRY.get_sample_value("shelfsight_model_signature_failures_total", {"category": "pans"}) or 0.0

    good = _publish(settings, store, taxonomy, seed=1, key=KEY)
    assert cache.get("pans").version == good
    before = failures()

    forged = _publish(settings, store, taxonomy, seed=2, key="an-attacker-key-without-ours")
    assert cache.refresh("pans") is False
    assert cache.get("pans").version == good and failures() == before + 1

    unsigned = _publish(settings, store, taxonomy, seed=3, key=None)
    assert cache.refresh("pans") is False
    assert cache.get("pans").version == good and failures() == before + 2

    hub = _publish(settings, store, taxonomy, seed=4, key=KEY, architecture="hf-hub:attacker/model")
    assert cache.refresh("pans") is False and cache.get("pans").version == good  # signed, still refused
    assert failures() == before + 2  # not a signature failure: a manifest check

    fixed = _publish(settings, store, taxonomy, seed=5, key=KEY)
    assert cache.refresh("pans") is True and cache.get("pans").version == fixed
    assert len({good, forged, unsigned, hub, fixed}) == 5


def test_a_fresh_worker_with_only_a_forged_model_never_serves_it(taxonomy: Taxonomy) -> None:
    from shelfsight.worker.model_cache import ZERO_SHOT_VERSION, ModelCache

    settings = Settings(model_arch=ARCH, model_weights="none", device="cpu", model_signing_key=KEY)
    store = InMemoryObjectStore()
    forged = _publish(settings, store, taxonomy, seed=6, key="an-attacker-key-without-ours")
    # no last good version in this worker, none below it in the history: the base model's zero-shot
    # heads serve (docs/reliability.md), the forged weights are never loaded, and the result says so
    served = ModelCache(settings, taxonomy, store, ModelRegistry(store, settings.bucket)).get("pans")
    assert served.version == ZERO_SHOT_VERSION and served.served_for == forged
