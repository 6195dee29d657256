"""The trainer's per-process clients (S3 store, Redis, taxonomy, model registry), built once."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore, S3ObjectStore
from shelfsight.shared.taxonomy import Taxonomy, load_taxonomy


@dataclass
class TrainerResources:
    """The trainer's clients, built once per process by its composition root and passed down."""

    settings: Settings
    store: ObjectStore
    redis: redis.Redis
    taxonomy: Taxonomy
    registry: ModelRegistry

    @classmethod
    def build(cls, settings: Settings, store: ObjectStore | None = None) -> TrainerResources:
        """Clients for `settings`; `store`, when given, replaces the S3 store built from them."""
        store = store or S3ObjectStore(settings)
        return cls(
            settings=settings,
            store=store,
            redis=redis.Redis.from_url(settings.broker_url),
            taxonomy=load_taxonomy(settings.taxonomy_path),
            registry=ModelRegistry(store, settings.bucket, settings.models_prefix),
        )
