"""Per-category models, resident within a memory budget, hot-swapped by reference.

A worker keeps, per category, one *active* CategoryModel: the image tower plus, per
attribute, the caption embeddings (computed once per checkpoint; the text tower is then
dropped). A promotion loads the new version beside the old one, verifies its sha256,
and swaps the reference. A batch takes its reference once, so in-flight work finishes on
the model it started with.

Swaps follow the registry's CURRENT by identity: a worker serves the version CURRENT names,
whatever the hosts' clocks say (CURRENT itself is written with compare-and-swap, see
shelfsight.shared.registry). A version that fails to load is backed off (not fetched again for
`model_retry_backoff_s`, doubling per failure) while the last good version keeps serving; a
worker that has no last good version serves the newest loadable version below it in the
promotion history, else zero-shot, and says so in its logs and in each result's model version.

Cold loads of all categories share one limiter (`model_load_concurrency` loads and
`model_load_memory_bytes` reserved at once) and never run on a batcher lane thread: a lane
takes the resident model, or the one its items were prepared with.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from shelfsight.shared import clip_math
from shelfsight.shared.model_factory import ClipBundle, create_clip
from shelfsight.shared.model_signing import ManifestSignatureError, load_trusted_manifest
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore, TransientStorageError
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.limits import ByteBudget

log = structlog.get_logger()

ZERO_SHOT_VERSION = "zero-shot"
MAX_MODEL_BACKOFF_S = 1800.0


class ModelUnavailable(TransientStorageError):
    """The category's CURRENT version cannot be loaded now (transiently) and nothing serves it yet."""


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
    served_for: str | None = None  # set on a fallback: the CURRENT version that would not load
    shared_tower: bool = False  # zero-shot models share the base tower: not counted per category
    # from the manifest (issue 11): attribute -> T (absent: 1), attribute -> review threshold (absent: never)
    temperatures: dict[str, float] = field(default_factory=dict)
    review_thresholds: dict[str, float] = field(default_factory=dict)

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-attribute calibrated probabilities [B, V] (softmax(logits / T)) for a batch of preprocessed images."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.dtype):
                features = self.visual(pixels.to(self.dtype))
        else:
            features = self.visual(pixels.to(self.dtype))
        return clip_math.score_heads(features.float(), self.heads, self.logit_scale, self.temperatures)


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
    taxonomy_version: str, served_for: str | None, shared_tower: bool,
    temperatures: dict[str, float] | None = None, review_thresholds: dict[str, float] | None = None,
) -> CategoryModel:
    visual = bundle.model.visual
    head_bytes = sum(h.text_features.numel() * h.text_features.element_size() for h in heads)
    return CategoryModel(
        category=category, version=version, mode=mode, architecture=bundle.architecture,
        weights_sha256=bundle.weights_sha256, taxonomy_version=taxonomy_version, visual=visual,
        heads=heads, logit_scale=float(bundle.model.logit_scale.detach().exp().clamp(max=100)),
        device=bundle.device, dtype=bundle.dtype, image_size=bundle.image_size, mean=bundle.mean,
        std=bundle.std, preprocess=bundle.preprocess, nbytes=head_bytes + (0 if shared_tower else module_bytes(visual)),
        served_for=served_for, shared_tower=shared_tower,
        temperatures=dict(temperatures or {}), review_thresholds=dict(review_thresholds or {}),
    )


@dataclass
class _Failure:
    """A version that failed to load: not tried again before `until` (monotonic seconds)."""

    count: int
    until: float
    transient: bool
    error: str


class ModelCache:
    """Active model per category, LRU-evicted within `settings.model_cache_bytes`."""

    def __init__(
        self,
        settings: Settings,
        taxonomy: Taxonomy,
        store: ObjectStore,
        registry: ModelRegistry,
        *,
        load_budget: ByteBudget | None = None,
    ) -> None:
        self.settings = settings
        self.taxonomy = taxonomy
        self.store = store
        self.registry = registry
        self._active: OrderedDict[str, CategoryModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _active and _failed
        self._load_locks: dict[str, threading.Lock] = {}
        self._failed: dict[tuple[str, str], _Failure] = {}
        self.load_budget = load_budget or ByteBudget(
            max(1, settings.model_load_memory_bytes), slots=max(1, settings.model_load_concurrency)
        )
        self._base: ClipBundle | None = None
        self._base_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- serving ----------------------------------------------------------------------------
    def get(self, category: str) -> CategoryModel:
        """The active model of a category, loading it (current version or zero-shot) on a miss."""
        resident = self.resident(category)
        if resident is not None:
            return resident
        model, _ = self._refresh(category)
        return model  # the model this call installed or found: never a second lookup

    def resident(self, category: str) -> CategoryModel | None:
        """The active model if it is in memory; never loads (what a batcher lane may call)."""
        with self._lock:
            model = self._active.get(category)
            if model is not None:
                self._active.move_to_end(category)
            return model

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
                    image_size=self.settings.train_image_size or None,  # the size the gate scored zero-shot at
                ))
                log.info("model.base_loaded", architecture=self._base.architecture,
                         weights_sha256=self._base.weights_sha256, seconds=round(time.perf_counter() - started, 2))
            return self._base

    def _compiled(self, bundle: ClipBundle) -> ClipBundle:
        """Optionally wrap the image tower in torch.compile (compiles on its first batch)."""
        if self.settings.torch_compile:
            bundle.model.visual = torch.compile(bundle.model.visual)
        return bundle

    def _zero_shot(self, category: str, served_for: str | None = None) -> CategoryModel:
        cat = self.taxonomy.category(category)
        bundle = self.base_bundle()
        values = {name: attr.value_names for name, attr in cat.attributes.items()}
        captions = {name: attr.captions(cat.zero_shot_template) for name, attr in cat.attributes.items()}
        heads = build_heads(bundle, values, captions)
        # no validation set ever judged zero-shot confidences: every zero-shot result needs review
        return _category_model(bundle, category, ZERO_SHOT_VERSION, "zero_shot", heads,
                               self.taxonomy.version, served_for, shared_tower=True,
                               review_thresholds={name: clip_math.REVIEW_ALL for name in values})

    def _fine_tuned(self, category: str, version: str, served_for: str | None = None) -> CategoryModel:
        # signature (when a key is set), path, taxonomy and architecture checks: before any weights load
        manifest, notes = load_trusted_manifest(self.registry, category, version,
                                                taxonomy=self.taxonomy, settings=self.settings)
        for note in notes:
            log.warning("model.manifest_note", category=category, version=version, note=note)
        # weights bytes + their state dict + the model built from it: reserved before any download
        with self.load_budget.reserve(3 * max(manifest.weights_bytes, 1)) as waited:
            metrics.MODEL_LOAD_WAIT_SECONDS.observe(waited)
            bundle = self._compiled(create_clip(
                manifest.architecture, self.registry.weights_uri(category, version),
                device=self.settings.device, precision=self.settings.precision, store=self.store,
                expected_sha256=manifest.weights_sha256,
                image_size=manifest.image_size or None,  # the size it was trained and gated at
            ))
            heads = build_heads(bundle, manifest.values, manifest.captions)  # text tower freed with bundle
        return _category_model(bundle, category, version, "fine_tuned", heads,
                               manifest.taxonomy_version, served_for, shared_tower=False,
                               temperatures=manifest.temperatures, review_thresholds=manifest.review_thresholds)

    def refresh(self, category: str) -> bool:
        """Make the category serve what the registry's CURRENT names. True if it swapped.

        Loads beside the active model and swaps by reference; on failure the active model
        stays, the version is backed off and the error is logged (see `_refresh`).
        """
        _, swapped = self._refresh(category)
        return swapped

    def _refresh(self, category: str) -> tuple[CategoryModel, bool]:
        """(the model the category serves after this call, whether it changed).

        Raises only when there is nothing to serve: CURRENT unreadable or its version failing
        transiently on a worker with no model for the category yet (the event is retried).
        """
        self.taxonomy.category(category)  # KeyError for unknown categories, before any I/O
        lock = self._load_locks.setdefault(category, threading.Lock())
        with lock:
            active = self.resident(category)
            try:
                pointer = self.registry.current(category)
            except Exception as exc:
                if active is None:
                    raise
                log.warning("model.current_unreadable", category=category, keeping=active.version, error=str(exc))
                return active, False
            target = pointer.version if pointer is not None else ZERO_SHOT_VERSION
            if active is not None and (pointer is None or active.version == target):
                return active, False  # identity, not clocks: CURRENT names what is served
            failure = self._backing_off(category, target)
            if failure is None:
                try:
                    return self._load_and_install(category, target, active), True
                except Exception as exc:  # noqa: BLE001 - recorded, then a decision below
                    failure = self._record_failure(category, target, exc, active)
            if active is not None:
                return active, False  # the last good version keeps serving
            if failure.transient:
                raise ModelUnavailable(f"{category} version {target} cannot be loaded now: {failure.error}")
            return self._install_fallback(category, target), True

    def _load_and_install(self, category: str, version: str, active: CategoryModel | None,
                          served_for: str | None = None) -> CategoryModel:
        started = time.perf_counter()
        if version == ZERO_SHOT_VERSION:
            new = self._zero_shot(category, served_for)
        else:
            new = self._fine_tuned(category, version, served_for)
        seconds = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.observe(seconds)
        with self._lock:
            self._failed.pop((category, version), None)
        self._install(new, active)
        log.info("model.swapped", category=category, version=new.version, mode=new.mode,
                 previous=active.version if active else None, load_seconds=round(seconds, 2),
                 resident_bytes=new.nbytes, standing_in_for=served_for)
        return new

    def _backing_off(self, category: str, version: str) -> _Failure | None:
        with self._lock:
            failure = self._failed.get((category, version))
        return failure if failure is not None and time.monotonic() < failure.until else None

    def _record_failure(self, category: str, version: str, exc: Exception,
                        active: CategoryModel | None) -> _Failure:
        metrics.MODEL_LOAD_FAILURES.labels(category=category).inc()
        if isinstance(exc, ManifestSignatureError):  # someone wrote the registry without the key
            metrics.MODEL_SIGNATURE_FAILURES.labels(category=category).inc()
            log.critical("model.signature_refused", category=category, error=str(exc),
                         keeping=active.version if active else None)
        transient = is_transient(exc)
        with self._lock:
            previous = self._failed.get((category, version))
            count = previous.count + 1 if previous else 1
            # transient failures come back sooner: they are expected to heal on their own
            base = self.settings.model_retry_backoff_s / (4 if transient else 1)
            delay = min(MAX_MODEL_BACKOFF_S, base * 2 ** (count - 1))
            failure = _Failure(count, time.monotonic() + delay, transient, f"{type(exc).__name__}: {exc}")
            self._failed[(category, version)] = failure
        log.error("model.load_failed", category=category, version=version, keeping=active.version if active else None,
                  transient=transient, failures=count, retry_in_s=round(delay, 1), error=failure.error)
        return failure

    def _install_fallback(self, category: str, failed: str) -> CategoryModel:
        """No last good version in this worker and `failed` will not load: serve the newest
        loadable version below it in the promotion history, else zero-shot."""
        try:
            stack = self.registry.serving_stack(category)
        except Exception as exc:  # noqa: BLE001 - zero-shot still serves
            log.warning("model.history_unreadable", category=category, error=str(exc))
            stack = []
        for version in reversed(stack):
            if version == failed or self._backing_off(category, version) is not None:
                continue
            try:
                model = self._load_and_install(category, version, None, served_for=failed)
            except Exception as exc:  # noqa: BLE001 - try the next one down
                self._record_failure(category, version, exc, None)
                continue
            log.warning("model.serving_fallback", category=category, version=version, current=failed)
            return model
        log.warning("model.serving_fallback", category=category, version=ZERO_SHOT_VERSION, current=failed)
        return self._load_and_install(category, ZERO_SHOT_VERSION, None, served_for=failed)

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
        """A pub/sub message {"category", "version"}: re-read CURRENT and swap if it names another version."""
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


def is_transient(exc: BaseException) -> bool:
    """True when a load failed for a reason expected to heal (S3 5xx, timeouts, denied access)
    rather than because the version itself is bad (signature, sha256, manifest, architecture)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TransientStorageError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
