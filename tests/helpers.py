"""Small test helpers: waiting on a condition (not sleeping for luck), making images."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from PIL import Image

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore

T = TypeVar("T")

TINY_ARCH = "shelfsight-tiny"


class RecordingRedis(redis.Redis):
    """redis.Redis that records its round trips: `trips` holds (pipelined, command names) for each
    single command and each pipeline executed. Build it over a pool; `trips` starts empty."""

    trips: list[tuple[bool, tuple[str, ...]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trips = []

    @property
    def sent(self) -> list[tuple[str, ...]]:
        """The command names of each round trip, in order."""
        return [names for _, names in self.trips]

    @property
    def rounds(self) -> list[int]:
        """Each round trip as a number: 0 for a single command, a pipeline's number of commands."""
        return [len(names) if pipelined else 0 for pipelined, names in self.trips]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.trips.append((False, (str(args[0]),)))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute, client = pipe.execute, self

        def recorded(raise_on_error: bool = True) -> list[Any]:
            client.trips.append((True, tuple(str(args[0]) for args, _ in pipe.command_stack)))
            return execute(raise_on_error)

        pipe.execute = recorded  # type: ignore[method-assign]
        return pipe


def wait_for(condition: Callable[[], T], timeout: float = 60.0, interval: float = 0.05) -> T:
    """Poll until `condition()` is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (96, 80), **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def png_bytes(mode: str = "RGBA", size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def distinct_tiny_weights(seed: int) -> dict:
    """A state dict of the tiny model that differs from its seeded random init."""
    import torch

    from shelfsight.shared.model_factory import create_clip

    state = {k: v.detach().clone().contiguous() for k, v in create_clip(TINY_ARCH, "none").model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    for name in ("visual.proj", "text_projection"):
        state[name] = torch.randn(state[name].shape, generator=generator)
    return state


def assert_weights_loaded(bundle: object, state: dict) -> None:
    """The bundle's model carries exactly these tensors (a sample that covers both towers)."""
    import torch

    loaded = bundle.model.state_dict()  # type: ignore[attr-defined]
    for name in ("visual.proj", "text_projection", "visual.conv1.weight"):
        assert torch.equal(loaded[name].float(), state[name].float()), name


def publish_tiny_version(settings: Settings, store: ObjectStore, category: str, seed: int,
                         *, corrupt_sha: bool = False, image_size: int | None = None) -> str:
    """Upload a distinct checkpoint of settings.model_arch as a registry version and promote it
    (trained at `image_size`, recorded in its manifest; None: the architecture's own)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from shelfsight.shared.model_factory import create_clip, sha256_bytes
    from shelfsight.shared.registry import Manifest, ModelRegistry, new_version
    from shelfsight.shared.taxonomy import load_taxonomy

    bundle = create_clip(settings.model_arch, "none", image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in bundle.model.state_dict().items()}
    proj = "visual.proj" if "visual.proj" in state else "visual.head.proj.weight"  # ViT, timm tower
    state[proj] += 0.5 * torch.randn(state[proj].shape, generator=generator)
    weights = save_safetensors(state)
    cat = load_taxonomy(settings.taxonomy_path).category(category)
    version = new_version()
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    registry.upload_version(Manifest(
        category=category, version=version, architecture=settings.model_arch, base_weights="none",
        taxonomy_version="test", values={n: a.value_names for n, a in cat.attributes.items()},
        captions={n: a.captions() for n, a in cat.attributes.items()},
        weights_sha256="0" * 64 if corrupt_sha else sha256_bytes(weights), weights_bytes=len(weights),
        image_size=image_size,
    ), weights)
    registry.promote(category, version, reason="test")
    return version


def upload_fake_version(registry: ModelRegistry, version: str, f1: float = 0.5, category: str = "pans") -> None:
    """Upload a registry version with placeholder weights (for registry bookkeeping, not loading)."""
    from shelfsight.shared.registry import Manifest

    registry.upload_version(Manifest(
        category=category, version=version, architecture=TINY_ARCH, base_weights="none", taxonomy_version="t",
        values={"lid": ["yes", "no"]}, captions={"lid": ["with lid", "without lid"]},
        weights_sha256="0" * 64, weights_bytes=1, metrics={"test_macro_f1": f1},
    ), b"w")


@contextlib.contextmanager
def extraction_worker(settings: Settings, concurrency: int = 8) -> Iterator:
    """A real Celery extraction worker (threads pool) in this process; yields its app."""
    from celery.contrib.testing.worker import start_worker

    from shelfsight.worker.app import create_worker_app
    from shelfsight.worker.runtime import runtime_of

    app = create_worker_app(settings)
    with start_worker(app, pool="threads", concurrency=concurrency, perform_ping_check=False, shutdown_timeout=30):
        yield app
    runtime_of(app).shutdown()


def run_cli(settings: Settings, *argv: str) -> int:
    """Run a `shelfsight` command in-process with these Settings; returns its exit code."""
    from shelfsight.shared.cli import main

    return main(list(argv), settings=settings)
