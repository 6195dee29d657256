"""Model registry in object storage.

Layout, per category::

    models/<category>/<version>/model.safetensors   immutable weights
    models/<category>/<version>/manifest.json       what they are (sha256 included)
    models/<category>/<version>/report.json, *.png  the training report
    models/<category>/CURRENT                       {"version": ...}: the serving version
    models/<category>/promotions/<seq>-<version>.json  append-only promotion history

A version is uploaded whole before CURRENT is flipped to it, with one PUT (atomic in S3),
so a reader sees the old version or the new one, never half of one.

CURRENT is written with compare-and-swap (If-Match on the ETag read, If-None-Match for the
first promotion): of two racing promotions, the second re-reads and builds on the first, so
CURRENT's `previous` and the history's order always agree. History entries are ordered by
CURRENT's sequence number, never by a host's clock (older entries, named by time, sort first).
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from shelfsight.shared.events import UtcDatetime
from shelfsight.shared.storage import ObjectMissing, ObjectStore, PreconditionFailed

MANIFEST_SCHEMA_VERSION = 1
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Manifest(BaseModel):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    category: str
    version: str
    architecture: str
    base_weights: str
    taxonomy_version: str
    values: dict[str, list[str]] = Field(description="attribute -> value names, in head order")
    captions: dict[str, list[str]] = Field(description="attribute -> caption texts, in value order")
    caption_template: str | None = None
    weights_sha256: str
    weights_bytes: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    labels_snapshot: dict[str, Any] = Field(default_factory=dict)
    test_set_key: str | None = None
    parent_version: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    training: dict[str, Any] = Field(default_factory=dict)
    # Reproducibility (all covered by the signature; absent from manifests written before them):
    test_set_sha256: str | None = Field(None, description="sha256 of the content-addressed test-set snapshot "
                                        "(test_set_key: models/<category>/test-sets/<sha256>.json)")
    base_weights_sha256: str | None = Field(None, description="sha256 of the base weights fine-tuned from")
    image_size: int | None = Field(None, description="input size in pixels (None: the architecture's own)")
    framing: str | None = Field(None, description="preprocessing framing, e.g. 'letterbox' (shared/framing.py)")
    precision: str | None = Field(None, description="training precision, e.g. 'fp32' or 'bf16-autocast'")
    device: str | None = Field(None, description="device trained on, e.g. 'cpu' or 'cuda (NVIDIA H100)'")
    split_seed: int | None = None
    train_seed: int | None = None
    software: dict[str, str] = Field(default_factory=dict, description="shelfsight version and commit, python, "
                                     "torch, torchvision, open_clip, timm versions")
    # Calibration and abstention (issue 11; absent from older manifests: T = 1 and never review):
    temperatures: dict[str, PositiveFinite] = Field(default_factory=dict, description="attribute -> temperature T fitted "
                                           "on the validation split; workers serve softmax(logits / T); 1.0 if absent")
    review_thresholds: dict[str, Finite] = Field(
        default_factory=dict, description="attribute -> lowest calibrated confidence whose validation precision "
        "reaches review_target_precision; a prediction below it needs review. Absent: never reviewed; "
        "above 1 (clip_math.REVIEW_ALL): always reviewed"
    )
    calibration: dict[str, Any] = Field(default_factory=dict, description="how they were chosen: target "
                                        "precision, per attribute validation support and test ECE before/after")
    signature: str | None = Field(
        None, description="hmac-sha256:<hex> over the rest of the manifest (shared/model_signing.py); "
        "set by the trainer when SHELFSIGHT_MODEL_SIGNING_KEY is, required by workers then"
    )


class Pointer(BaseModel):
    version: str
    updated_at: UtcDatetime = Field(default_factory=lambda: datetime.now(UTC))  # informative only
    reason: str = ""
    previous: str | None = None
    rollback: bool = False
    sequence: int = Field(0, description="1 for a category's first promotion, +1 each time (0: written "
                          "before sequences); orders the history")


class ConcurrentPromotion(RuntimeError):
    """CURRENT kept changing under this promotion (compare-and-swap lost repeatedly)."""


class ChampionChanged(RuntimeError):
    """CURRENT no longer names the version a conditional promotion expected."""


PROMOTE_ATTEMPTS = 5

def new_version() -> str:
    """Sortable, unique version id: v<UTC time>-<random>."""
    return f"v{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


class ModelRegistry:
    """Read and write the registry layout above in one bucket."""

    def __init__(self, store: ObjectStore, bucket: str, prefix: str = "models") -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def key(self, category: str, *parts: str) -> str:
        return "/".join([self.prefix, category, *parts])

    def weights_uri(self, category: str, version: str) -> str:
        return f"s3://{self.bucket}/{self.key(category, version, 'model.safetensors')}"

    def current(self, category: str) -> Pointer | None:
        """The serving version's pointer, or None if the category has never been promoted."""
        return self.current_with_etag(category)[0]

    def current_with_etag(self, category: str) -> tuple[Pointer | None, str | None]:
        """CURRENT and its ETag (what a compare-and-swap must match); (None, None) if absent."""
        try:
            stored = self.store.get(self.bucket, self.key(category, "CURRENT"), max_bytes=65536)
        except ObjectMissing:
            return None, None
        return Pointer.model_validate_json(stored.body), stored.etag

    def manifest(self, category: str, version: str) -> Manifest:
        body = self.store.get(self.bucket, self.key(category, version, "manifest.json"), max_bytes=4 << 20).body
        return Manifest.model_validate_json(body)

    def versions(self, category: str) -> list[str]:
        """All versions that have a manifest, oldest first."""
        keys = self.store.list_keys(self.bucket, self.key(category) + "/")
        suffix = "/manifest.json"
        return sorted(k.split("/")[-2] for k in keys if k.endswith(suffix))

    def categories(self) -> list[str]:
        keys = self.store.list_keys(self.bucket, self.prefix + "/")
        return sorted({k.split("/")[1] for k in keys if k.count("/") >= 2})

    def upload_version(
        self, manifest: Manifest, weights: bytes, extra_files: dict[str, tuple[bytes, str]] | None = None
    ) -> None:
        """Upload an immutable version: extra files, then weights, then the manifest last."""
        cat, ver = manifest.category, manifest.version
        for name, (body, content_type) in (extra_files or {}).items():
            self.store.put(self.bucket, self.key(cat, ver, name), body, content_type)
        self.store.put(self.bucket, self.key(cat, ver, "model.safetensors"), weights, "application/octet-stream")
        self.store.put(self.bucket, self.key(cat, ver, "manifest.json"), manifest.model_dump_json(indent=2).encode())

    def promote(self, category: str, version: str, reason: str, *, rollback: bool = False) -> Pointer:
        """Point CURRENT at `version` (which must have a manifest) and record the promotion."""
        self.manifest(category, version)  # raises ObjectMissing for an unknown version
        return self._swap(category, lambda _old: (version, reason), rollback=rollback)

    def promote_if_current(self, category: str, version: str, reason: str, expected: str | None) -> Pointer:
        """Promote `version` only while CURRENT still names `expected` (None: nothing promoted yet).

        For the training gate: a challenger is promoted over the champion it was compared with,
        never over one promoted meanwhile. Raises ChampionChanged otherwise (compare-and-swap).
        """
        self.manifest(category, version)

        def choose(current: Pointer | None) -> tuple[str, str]:
            serving = current.version if current else None
            if serving != expected:
                raise ChampionChanged(f"{category}: CURRENT is {serving}, not {expected} that the gate compared "
                                      f"{version} with; not promoted")
            return version, reason

        return self._swap(category, choose)

    def _swap(self, category: str, choose: Any, *, rollback: bool = False) -> Pointer:
        """Compare-and-swap CURRENT to what `choose(current pointer)` names, then record it.

        `choose` returns (version, reason); it is called again with the new CURRENT when another
        promotion won the race, so a decision is always made on what is actually serving.
        """
        for _ in range(PROMOTE_ATTEMPTS):
            old, etag = self.current_with_etag(category)
            version, reason = choose(old)
            pointer = Pointer(version=version, reason=reason, previous=old.version if old else None,
                              rollback=rollback, sequence=(old.sequence if old else 0) + 1)
            body = pointer.model_dump_json().encode()
            try:
                if etag is None:
                    self.store.put(self.bucket, self.key(category, "CURRENT"), body, if_none_match=True)
                else:
                    self.store.put(self.bucket, self.key(category, "CURRENT"), body, if_match=etag)
            except PreconditionFailed:
                continue  # another promotion landed first: decide again on top of it
            # after the swap, so the history never names a promotion that lost; named by sequence
            name = f"{pointer.sequence:010d}-{version}.json"
            self.store.put(self.bucket, self.key(category, "promotions", name), body)
            return pointer
        raise ConcurrentPromotion(f"{category}: CURRENT changed {PROMOTE_ATTEMPTS} times during this promotion")

    def history(self, category: str) -> list[Pointer]:
        """Promotions, oldest first: by sequence, then (entries written before sequences) by name."""
        keys = self.store.list_keys(self.bucket, self.key(category, "promotions") + "/")
        entries = [(Pointer.model_validate_json(self.store.get(self.bucket, k).body), k) for k in keys]
        return [pointer for pointer, _ in sorted(entries, key=lambda e: (e[0].sequence, e[1]))]

    def serving_stack(self, category: str) -> list[str]:
        """Versions as a stack: a promotion pushes, a rollback pops. The top serves now."""
        stack: list[str] = []
        for pointer in self.history(category):
            if pointer.rollback and stack:
                stack.pop()
            else:
                stack.append(pointer.version)
        return stack

    def rollback(self, category: str) -> Pointer:
        """Serve the version promoted before the current one; repeated rollbacks walk further back."""

        def choose(current: Pointer | None) -> tuple[str, str]:
            stack = self.serving_stack(category)
            if current is not None and (not stack or stack[-1] != current.version):
                stack.append(current.version)  # a history entry lost after its swap: CURRENT is the truth
            if len(stack) < 2:
                raise ValueError(f"{category}: nothing to roll back to (serving history {stack})")
            return stack[-2], f"rollback from {stack[-1]}"

        return self._swap(category, choose, rollback=True)

    def put_json(self, category: str, name: str, payload: dict[str, Any]) -> None:
        self.store.put(self.bucket, self.key(category, name), json.dumps(payload, indent=2).encode())
