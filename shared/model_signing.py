"""Model manifests a worker can trust: an HMAC signature, and checks that need no key.

The sha256 in a manifest catches corrupt weights, but the manifest sits beside the weights,
writable with the same rights, so on its own it cannot catch tampering. With
`SHELFSIGHT_MODEL_SIGNING_KEY` set, the trainer signs each manifest (HMAC-SHA256 over its
canonical JSON, the weights' sha256 included) and workers refuse a manifest whose signature is
missing or wrong. Whether or not a key is set, a worker refuses a manifest that does not
describe what its path and its own taxonomy say it is, or whose architecture is not on the
allowlist (never `hf-hub:`, `local-dir:` or a path taken from a manifest).

Canonical form: the manifest's JSON object as stored, without its "signature" member,
serialised with sorted keys and no whitespace (`canonical_bytes`). The signature is
"hmac-sha256:<hex>" in the manifest's "signature" member.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr, ValidationError

from shelfsight.shared.model_factory import WeightsError
from shelfsight.shared.registry import Manifest, ModelRegistry
from shelfsight.shared.taxonomy import Taxonomy

SIGNATURE_FIELD = "signature"
SCHEME = "hmac-sha256:"
MANIFEST_MAX_BYTES = 4 << 20
MAX_CAPTION_CHARS = 512
# Architecture names only: no hub or local-directory schemes, no paths, nothing to resolve.
_ARCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ManifestRefused(WeightsError):
    """The manifest is not one this worker will serve; the message says which check failed."""


class ManifestSignatureError(ManifestRefused):
    """Signing is on and the manifest's signature is missing or wrong (an alert, not a glitch)."""


def _key_bytes(key: SecretStr | str) -> bytes:
    text = key.get_secret_value() if isinstance(key, SecretStr) else key
    if not text:
        raise ValueError("the model signing key is empty")
    return text.encode()


def canonical_bytes(payload: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: the manifest object minus its signature, keys sorted."""
    body = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature_for(payload: Mapping[str, Any], key: SecretStr | str) -> str:
    """`hmac-sha256:<hex>` of the canonical manifest."""
    return SCHEME + hmac.new(_key_bytes(key), canonical_bytes(payload), hashlib.sha256).hexdigest()


def sign_manifest(manifest: Manifest, key: SecretStr | str) -> Manifest:
    """A copy of `manifest` carrying its signature (compute it last: it covers every field)."""
    payload = json.loads(manifest.model_dump_json(exclude={SIGNATURE_FIELD}))
    return manifest.model_copy(update={SIGNATURE_FIELD: signature_for(payload, key)})


def verify_signature(payload: Mapping[str, Any], key: SecretStr | str) -> None:
    """ManifestSignatureError unless the payload carries the right signature for `key`."""
    claimed = payload.get(SIGNATURE_FIELD)
    if not isinstance(claimed, str) or not claimed:
        raise ManifestSignatureError("manifest is unsigned, and SHELFSIGHT_MODEL_SIGNING_KEY requires a signature")
    if not hmac.compare_digest(claimed.encode(), signature_for(payload, key).encode()):
        raise ManifestSignatureError(
            "manifest signature does not match (signed with another key, or edited after signing)"
        )


def allowed_architectures(settings: Any) -> frozenset[str]:
    """The base architecture plus SHELFSIGHT_ALLOWED_MODEL_ARCHITECTURES."""
    return frozenset({settings.model_arch, *getattr(settings, "allowed_model_architectures", [])})


def check_manifest(manifest: Manifest, *, category: str, version: str, taxonomy: Taxonomy,
                   architectures: Iterable[str]) -> list[str]:
    """Refuse a manifest that is not what its path and the worker's taxonomy say it is.

    Returns notes worth logging (a taxonomy version that differs while the category's
    attributes and values are identical); raises ManifestRefused otherwise.
    """
    where = f"manifest of {category}/{version}"
    if manifest.category != category or manifest.version != version:
        raise ManifestRefused(
            f"{where} says it is {manifest.category!r}/{manifest.version!r}: it does not match its path"
        )
    arch = manifest.architecture
    if not _ARCH_NAME.match(arch) or arch not in set(architectures):
        raise ManifestRefused(
            f"{where} names architecture {arch[:80]!r}, which is not allowed "
            "(SHELFSIGHT_MODEL_ARCH and SHELFSIGHT_ALLOWED_MODEL_ARCHITECTURES; never hub, directory or path names)"
        )
    expected = {name: set(attr.value_names) for name, attr in taxonomy.category(category).attributes.items()}
    got = {name: set(values) for name, values in manifest.values.items()}
    if got != expected or any(len(v) != len(set(v)) for v in manifest.values.values()):
        raise ManifestRefused(
            f"{where} has attributes/values that differ from this worker's taxonomy {taxonomy.version} "
            f"(manifest taxonomy {manifest.taxonomy_version!r}); retrain the category"
        )
    for name, values in manifest.values.items():
        captions = manifest.captions.get(name)
        if captions is None or len(captions) != len(values):
            raise ManifestRefused(f"{where}: attribute {name!r} needs one caption per value")
        if any(not c or len(c) > MAX_CAPTION_CHARS for c in captions):
            raise ManifestRefused(f"{where}: attribute {name!r} has an empty or over-long caption")
    if set(manifest.captions) != set(manifest.values):
        raise ManifestRefused(f"{where}: captions name attributes that have no values")
    if manifest.taxonomy_version != taxonomy.version:
        return [f"trained on taxonomy {manifest.taxonomy_version!r}, serving with {taxonomy.version!r}; "
                f"{category}'s attributes and values are identical in both"]
    return []


def load_trusted_manifest(registry: ModelRegistry, category: str, version: str, *, taxonomy: Taxonomy,
                          settings: Any) -> tuple[Manifest, list[str]]:
    """Read a version's manifest, verify its signature (when a key is set) and check it.

    Returns the manifest and notes worth logging. Raises ManifestSignatureError,
    ManifestRefused (both WeightsError), or the store's errors.
    """
    key = registry.key(category, version, "manifest.json")
    body = registry.store.get(registry.bucket, key, max_bytes=MANIFEST_MAX_BYTES).body
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ManifestRefused(f"manifest s3://{registry.bucket}/{key} is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ManifestRefused(f"manifest s3://{registry.bucket}/{key} is not a JSON object")
    signing_key: SecretStr | None = getattr(settings, "model_signing_key", None)
    if signing_key is not None and signing_key.get_secret_value():
        verify_signature(payload, signing_key)
    try:
        manifest = Manifest.model_validate(payload)
    except ValidationError as exc:
        raise ManifestRefused(f"manifest s3://{registry.bucket}/{key} is invalid: {exc.errors()[:3]}") from None
    notes = check_manifest(manifest, category=category, version=version, taxonomy=taxonomy,
                           architectures=allowed_architectures(settings))
    return manifest, notes
