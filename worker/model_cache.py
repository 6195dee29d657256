"""Per-category models, resident within a memory budget, hot-swapped by reference.

A worker keeps, per category, one *active* CategoryModel: the image tower plus, per
attribute, the caption embeddings (computed once per checkpoint; the text tower is then
dropped). A promotion loads the new version beside the old one, verifies its sha256,
and swaps the reference. A batch takes its reference once, so in-flight work finishes on
the model it started with. A failed load keeps the old model.

Swaps are ordered by the registry pointer's `updated_at`, so a stale poll can never move
a worker back to an older promotion (a rollback is a newer promotion and is followed).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
import torch

from shelfsight.shared import clip_math
from shelfsight.shared.model_factory import ClipBundle, create_clip
from shelfsight.shared.model_signing import ManifestSignatureError, load_trusted_manifest
from shelfsight.shared.registry import ModelRegistry, Pointer
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.worker import metrics

log = structlog.get_logger()

ZERO_SHOT_VERSION = "zero-shot"


@dataclass
class CategoryModel:
    """What inference needs for one category at one version."""

    category: str
    version: str
    mode: str  # "fine_tuned" | "zero_shot"
    architecture: str
    weights_sha256: str
    taxonomy_version: str
    visual: torch.nn.Module
    heads: tuple[clip_math.AttributeHead, ...]
    logit_scale: float
    device: torch.device
    dtype: torch.dtype
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nbytes: int
    preprocess: Callable[[Any], torch.Tensor]
    pointer_time: datetime | None = None
    shared_tower: bool = False  # zero-shot models share the base tower: not counted per category

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-attribute probabilities [B, V] for a batch of preprocessed images."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.dtype):
                features = self.visual(pixels.to(self.dtype))
        else:
            features = self.visual(pixels.to(self.dtype))
        return clip_math.score_heads(features.float(), self.heads, self.logit_scale)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def build_heads(
    bundle: ClipBundle, values: dict[str, list[str]], captions: dict[str, list[str]]
) -> tuple[clip_math.AttributeHead, ...]:
    """Caption embeddings per attribute, computed once with the bundle's text tower."""
    heads = []
    with torch.inference_mode():
        for name, names in values.items():
            feats = clip_math.encode_captions(
                bundle.model.encode_text, bundle.tokenizer, captions[name], bundle.device
            )
            heads.append(clip_math.AttributeHead(name=name, values=tuple(names), text_features=feats))
    return tuple(heads)


def _category_model(
    bundle: ClipBundle, category: str, version: str, mode: str, heads: tuple[clip_math.AttributeHead, ...],
    taxonomy_version: str, pointer_time: datetime | None, shared_tower: bool,
) -> CategoryModel:
    visual = bundle.model.visual
    head_bytes = sum(h.text_features.numel() * h.text_features.element_size() for h in heads)
    return CategoryModel(
        category=category, version=version, mode=mode, architecture=bundle.architecture,
        weights_sha256=bundle.weights_sha256, taxonomy_version=taxonomy_version, visual=visual,
        heads=heads, logit_scale=float(bundle.model.logit_scale.detach().exp().clamp(max=100)),
        device=bundle.device, dtype=bundle.dtype, image_size=bundle.image_size, mean=bundle.mean,
        std=bundle.std, preprocess=bundle.preprocess, nbytes=head_bytes + (0 if shared_tower else module_bytes(visual)),
        pointer_time=pointer_time, shared_tower=shared_tower,
    )


class ModelCache:
    """Active model per category, LRU-evicted within `settings.model_cache_bytes`."""

    def __init__(
        self,
        settings: Settings,
        taxonomy: Taxonomy,
        store: ObjectStore,
        registry: ModelRegistry,
    ) -> None:
        self.settings = settings
        self.taxonomy = taxonomy
        self.store = store
        self.registry = registry
        self._active: OrderedDict[str, CategoryModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _active
        self._load_locks: dict[str, threading.Lock] = {}
        self._base: ClipBundle | None = None
        self._base_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- serving ----------------------------------------------------------------------------
    def get(self, category: str) -> CategoryModel:
        """The active model of a category, loading it (current version or zero-shot) on a miss."""
        with self._lock:
            model = self._active.get(category)
            if model is not None:
                self._active.move_to_end(category)
                return model
        self.refresh(category)
        with self._lock:
            return self._active[category]

    def active_versions(self) -> dict[str, str]:
        with self._lock:
            return {c: m.version for c, m in self._active.items()}

    # --- loading ----------------------------------------------------------------------------
    def base_bundle(self) -> ClipBundle:
        """The base model (settings.model_arch / model_weights), built once."""
        with self._base_lock:
            if self._base is None:
                started = time.perf_counter()
                self._base = self._compiled(create_clip(
                    self.settings.model_arch, self.settings.model_weights, device=self.settings.device,
                    precision=self.settings.precision, store=self.store,
                ))
                log.info("model.base_loaded", architecture=self._base.architecture,
                         weights_sha256=self._base.weights_sha256, seconds=round(time.perf_counter() - started, 2))
            return self._base

    def _compiled(self, bundle: ClipBundle) -> ClipBundle:
        """Optionally wrap the image tower in torch.compile (compiles on its first batch)."""
        if self.settings.torch_compile:
            bundle.model.visual = torch.compile(bundle.model.visual)
        return bundle

    def _zero_shot(self, category: str) -> CategoryModel:
        cat = self.taxonomy.category(category)
        bundle = self.base_bundle()
        values = {name: attr.value_names for name, attr in cat.attributes.items()}
        captions = {name: attr.captions(cat.zero_shot_template) for name, attr in cat.attributes.items()}
        heads = build_heads(bundle, values, captions)
        return _category_model(bundle, category, ZERO_SHOT_VERSION, "zero_shot", heads,
                               self.taxonomy.version, None, shared_tower=True)

    def _fine_tuned(self, category: str, pointer: Pointer) -> CategoryModel:
        # signature (when a key is set), path, taxonomy and architecture checks: before any weights load
        manifest, notes = load_trusted_manifest(self.registry, category, pointer.version,
                                                taxonomy=self.taxonomy, settings=self.settings)
        for note in notes:
            log.warning("model.manifest_note", category=category, version=pointer.version, note=note)
        bundle = self._compiled(create_clip(
            manifest.architecture, self.registry.weights_uri(category, pointer.version),
            device=self.settings.device, precision=self.settings.precision, store=self.store,
            expected_sha256=manifest.weights_sha256,
        ))
        heads = build_heads(bundle, manifest.values, manifest.captions)  # text tower freed with bundle
        return _category_model(bundle, category, pointer.version, "fine_tuned", heads,
                               manifest.taxonomy_version, pointer.updated_at, shared_tower=False)

    def refresh(self, category: str) -> bool:
        """Make the category serve what the registry's CURRENT names. True if it swapped.

        Loads beside the active model and swaps by reference; on failure the active model
        stays and the error is logged (and re-raised only if there is nothing to serve).
        """
        self.taxonomy.category(category)  # KeyError for unknown categories, before any I/O
        lock = self._load_locks.setdefault(category, threading.Lock())
        with lock:
            with self._lock:
                active = self._active.get(category)
            try:
                pointer = self.registry.current(category)
                if active is not None and not _is_newer(pointer, active):
                    return False
                started = time.perf_counter()
                new = self._zero_shot(category) if pointer is None else self._fine_tuned(category, pointer)
                seconds = time.perf_counter() - started
            except Exception as exc:
                metrics.MODEL_LOAD_FAILURES.labels(category=category).inc()
                if isinstance(exc, ManifestSignatureError):  # someone wrote the registry without the key
                    metrics.MODEL_SIGNATURE_FAILURES.labels(category=category).inc()
                    log.critical("model.signature_refused", category=category, error=str(exc),
                                 keeping=active.version if active else None)
                if active is None:
                    raise
                log.error("model.load_failed", category=category, keeping=active.version,
                          error=f"{type(exc).__name__}: {exc}")
                return False
            metrics.MODEL_LOAD_SECONDS.observe(seconds)
            self._install(new, active)
            log.info("model.swapped", category=category, version=new.version, mode=new.mode,
                     previous=active.version if active else None, load_seconds=round(seconds, 2),
                     resident_bytes=new.nbytes)
            return True

    def _install(self, new: CategoryModel, old: CategoryModel | None) -> None:
        with self._lock:
            self._active[new.category] = new  # the swap: one reference assignment
            self._active.move_to_end(new.category)
            self._evict_locked(keep=new.category)
            metrics.RESIDENT_MODELS.set(len(self._active))
            metrics.RESIDENT_BYTES.set(sum(m.nbytes for m in self._active.values()))
        if old is not None:
            metrics.MODEL_SWAPS.labels(category=new.category).inc()

    def _evict_locked(self, keep: str) -> None:
        budget = self.settings.model_cache_bytes
        while sum(m.nbytes for m in self._active.values()) > budget and len(self._active) > 1:
            victim = next(c for c in self._active if c != keep)
            evicted = self._active.pop(victim)
            log.info("model.evicted", category=victim, version=evicted.version, bytes=evicted.nbytes)

    # --- learning of promotions -------------------------------------------------------------
    def handle_announcement(self, payload: str | bytes) -> None:
        """A pub/sub message {"category", "version"}: re-read CURRENT and swap if newer."""
        try:
            category = json.loads(payload)["category"]
        except (ValueError, KeyError, TypeError):
            log.warning("model.bad_announcement", payload=str(payload)[:200])
            return
        with self._lock:
            served = category in self._active
        if served:  # categories not resident load CURRENT on first use anyway
            self.refresh(category)

    def poll_once(self) -> None:
        """Fallback for lost pub/sub messages: compare every resident category with CURRENT."""
        for category in list(self.active_versions()):
            try:
                self.refresh(category)
            except Exception as exc:  # noqa: BLE001 - keep polling the others
                log.error("model.poll_failed", category=category, error=str(exc))

    def start_background(self, redis_client) -> None:  # noqa: ANN001 - redis.Redis
        """Listen for announcements and poll CURRENT, each in a daemon thread."""
        def listen() -> None:
            while not self._stop.is_set():
                pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.subscribe(self.settings.model_events_channel)
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message and message.get("type") == "message":
                            self.handle_announcement(message["data"])
                except Exception as exc:  # noqa: BLE001 - reconnect; polling covers the gap
                    log.warning("model.listener_error", error=str(exc))
                    self._stop.wait(1.0)
                finally:
                    pubsub.close()

        def poll() -> None:
            while not self._stop.wait(self.settings.model_poll_interval_s):
                self.poll_once()

        for target, name in ((listen, "model-listener"), (poll, "model-poller")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


def _is_newer(pointer: Pointer | None, active: CategoryModel) -> bool:
    if pointer is None:
        return False  # never promoted: keep whatever serves (zero-shot)
    if active.pointer_time is None:
        return True  # zero-shot → first fine-tuned version
    return pointer.version != active.version and pointer.updated_at > active.pointer_time
