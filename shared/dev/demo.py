"""`shelfsight demo`: the whole service on an embedded stack, with sample products.

1. Brings up Redis, an S3 server, an extraction worker, the trainer worker, Flower and the relay.
2. Extracts features of held-out sample products with the base model (zero-shot); shows a
   corrupt upload becoming a dead letter, and an upload flowing through the relay.
3. Imports sample labels, trains each category on the trainer worker, and promotes it.
4. The running worker hot-swaps to the new versions (same process, no restart); the same
   products are extracted again and scored against the images' known truth.
5. Tears everything down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from shelfsight.shared.celery_app import IMPORT_LABELS_TASK, create_celery_app
from shelfsight.shared.dev.samples import SampleProduct, generate_products, upload_products
from shelfsight.shared.dev.stack import start_stack, terminated_by_signal
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.events import result_key
from shelfsight.shared.relay.demo import upload_through_relay
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.shared.training_jobs import enqueue_training

# Short, CPU-friendly training for the demo: a few epochs on small sample sets.
DEMO_TRAINING_ENV = {
    "SHELFSIGHT_TRAIN_EPOCHS": "8",
    "SHELFSIGHT_TRAIN_PATIENCE": "3",
    "SHELFSIGHT_TRAIN_BATCH_SIZE": "12",
    "SHELFSIGHT_TRAIN_LR": "1e-4",  # bench/learning_curve.py: higher rates collapse the fresh text tower
    "SHELFSIGHT_TRAIN_WARMUP_STEPS": "5",
    "SHELFSIGHT_RETRAIN_AFTER_LABELS": "0",  # the demo triggers training itself
    "SHELFSIGHT_BATCH_SIZE": "8",
    "SHELFSIGHT_MODEL_POLL_INTERVAL_S": "5",
}
LABELED = {"pans": 64, "tops": 96}  # ≥ 10 frozen test examples per attribute: the gate needs evidence
HELD_OUT = {"pans": 8, "tops": 8}


def extract_and_wait(settings: Settings, products: list[SampleProduct], uris: list[str], timeout_s: float = 300) -> dict[str, dict]:
    """Enqueue every product and wait for a result newer than this call; results by product id."""
    app = create_celery_app(settings)
    store = S3ObjectStore(settings)
    event_ids = {
        product.product_id: enqueue_upload(app, product_id=product.product_id, category=product.category, image=uri)
        for product, uri in zip(products, uris, strict=True)
    }
    pending = {p.product_id: p for p in products}
    results: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for pid, product in list(pending.items()):
            key = result_key(settings.results_prefix, product.category, pid)
            if store.exists(settings.bucket, key):
                result = json.loads(store.get(settings.bucket, key).body)
                if result["event_id"] == event_ids[pid]:
                    results[pid] = result
                    del pending[pid]
        time.sleep(0.2)
    if pending:
        raise TimeoutError(f"no result after {timeout_s}s for {sorted(pending)}; see the worker log")
    return results


def print_table(products: list[SampleProduct], results: dict[str, dict]) -> float:
    """One row per product: each attribute as predicted (confidence, "review" when it needs review),
    marked ✗ where it is wrong."""
    rows, right, total = [], 0, 0
    for product in products:
        result = results[product.product_id]
        cells = []
        for attr, truth in product.attributes.items():
            got = result["attributes"][attr]
            ok = got["value"] == truth
            right, total = right + ok, total + 1
            review = ", review" if got.get("needs_review") else ""
            cells.append(f"{attr}={got['value']} ({got['confidence']:.2f}{review}){'' if ok else ' ✗ truth ' + truth}")
        rows.append(f"{product.product_id:<16} {result['model']['version']:<24} " + "; ".join(cells))
    print(f"{'product':<16} {'model version':<24} extracted features")
    print("\n".join(rows))
    accuracy = right / total if total else 0.0
    print(f"attribute accuracy against the images' known truth: {right}/{total} = {accuracy:.2f}")
    return accuracy


def _import_labels(settings: Settings, products: list[SampleProduct], uris: list[str]) -> dict[str, Any]:
    """Send the labels to the trainer worker's import task, as a data team's script would."""
    labels = [{"product_id": p.product_id, "category": p.category, "image": uri, "attributes": p.attributes}
              for p, uri in zip(products, uris, strict=True)]
    result = create_celery_app(settings).send_task(IMPORT_LABELS_TASK, args=[labels])
    summary: dict[str, Any] = result.get(timeout=120)
    return summary


def _train(settings: Settings, category: str) -> dict:
    """Enqueue a training on the trainer worker and follow its progress states."""
    app = create_celery_app(settings)
    enqueued = enqueue_training(app, redis.Redis.from_url(settings.broker_url),
                                load_taxonomy(settings.taxonomy_path), category, reason="demo")
    result = app.AsyncResult(enqueued.task_id)
    last = None
    while not result.ready():
        info = result.info if result.state == "PROGRESS" and isinstance(result.info, dict) else None
        if info and info.get("epoch") != last:
            last = info.get("epoch")
            print(f"  {category}: {json.dumps(info, default=str)}")
        time.sleep(0.5)
    if result.failed():
        raise RuntimeError(f"training {category} failed: {result.result!r}")
    return result.result


def _wait_for_swap(settings: Settings, category: str, version: str, uri: str, probe: SampleProduct, timeout_s: float = 120) -> None:
    """Probe the worker until a result shows `version`: the running worker swapped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = extract_and_wait(settings, [probe], [uri])[probe.product_id]
        if result["model"]["version"] == version:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the worker did not swap {category} to {version} within {timeout_s}s")


def show_dead_letter(settings: Settings, store: S3ObjectStore, timeout_s: float = 60) -> None:
    """Upload a corrupt image, enqueue it, and print the dead letter the worker records."""
    store.put(settings.bucket, "uploads/pans/broken-1.jpg", b"\xff\xd8\xff\xe0 this upload was cut short", "image/jpeg")
    event_id = enqueue_upload(create_celery_app(settings), product_id="broken-1", category="pans",
                              image=f"s3://{settings.bucket}/uploads/pans/broken-1.jpg")
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries: Any = client.xrange(settings.dead_letter_stream)
        for _, fields in entries:
            if fields["event_id"] == event_id:
                bucket, key = fields["record"].removeprefix("s3://").split("/", 1)
                print(f"dead letter {fields['record']}:")
                print(json.dumps(json.loads(store.get(bucket, key).body), indent=2))
                return
        time.sleep(0.2)
    raise TimeoutError(f"no dead letter for {event_id} after {timeout_s}s")


def run_demo(state_dir: Path, base: Settings) -> int:
    """The `make demo` job, run against a fresh stack configured from `base`. Returns an exit code."""
    with terminated_by_signal(), start_stack(state_dir, base, worker=True, trainer=True, flower=True, relay=True,
                                             extra_env=DEMO_TRAINING_ENV) as stack:  # SIGTERM stops the stack
        settings = stack.client_settings(base)
        worker_pid = stack.processes["worker"].pid
        print("dev stack up:", ", ".join(f"{k}=127.0.0.1:{v}" for k, v in stack.ports.items()),
              f"(Flower basic auth: generated, in {stack.state_path}; worker pid {worker_pid})")
        store = S3ObjectStore(settings)
        held_out = [p for c, n in HELD_OUT.items() for p in generate_products(c, n, seed=900)]
        held_out_uris = upload_products(held_out, store, settings.bucket, prefix="uploads")

        print("\n== 1. extraction with the base model (zero-shot: no category has a fine-tuned model yet)")
        before = extract_and_wait(settings, held_out, held_out_uris)
        zero_shot_accuracy = print_table(held_out, before)

        print("\n== 1b. a corrupt upload becomes a dead letter; the worker carries on")
        show_dead_letter(settings, store)

        print("\n== 1c. an upload flows through the relay (PUT + storage notification → relay → worker; no enqueue call)")
        body = store.get(settings.bucket, held_out_uris[0].split("/", 3)[3]).body
        key = f"uploads/{held_out[0].category}/via-relay-1.jpg"
        relayed = upload_through_relay(settings, key, body)
        print(f"  s3://{settings.bucket}/{key} → event {relayed['event_id']} → "
              + ", ".join(f"{a}={r['value']}" for a, r in relayed["attributes"].items()))

        print("\n== 2. labels: import sample labels for each category")
        labeled = [p for c, n in LABELED.items() for p in generate_products(c, n, seed=7)]
        labeled_uris = upload_products(labeled, store, settings.bucket, prefix="labeled")
        summary = _import_labels(settings, labeled, labeled_uris)
        print(f"  accepted {summary['accepted']} labels, rejected {summary['rejected']}")

        print("\n== 3. train each category on the trainer worker (progress from Celery task state)")
        versions: dict[str, str] = {}
        for category in LABELED:
            outcome = _train(settings, category)
            if outcome["promoted"]:  # the gate (vs zero-shot) may refuse it: then zero-shot keeps serving
                versions[category] = outcome["version"]
            print(f"  {category}: {outcome['status']} {outcome['version']} (test macro-F1 "
                  f"{outcome['test_macro_f1']:.3f} on {outcome['splits'].get('test', '?')} frozen test images)")
            print(f"    gate: {outcome['reason']}")
            for attr, cal in (outcome.get("calibration") or {}).items():
                ece = (f"test ECE {cal['ece_before']:.3f} → {cal['ece_after']:.3f}" if cal["ece_before"] is not None
                       else "no labeled test images")
                threshold = cal["review_threshold"]
                review = ("never reviewed" if threshold is None else "always reviewed" if threshold > 1
                          else f"review below {threshold:.3f}")
                print(f"    calibration {attr}: T={cal['temperature']:.2f}, {ece}, {review} ({cal['status']})")

        print("\n== 4. the running worker hot-swaps to the promoted versions")
        for category, version in versions.items():
            probe_index = next(i for i, p in enumerate(held_out) if p.category == category)
            _wait_for_swap(settings, category, version, held_out_uris[probe_index], held_out[probe_index])
            print(f"  worker pid {worker_pid} now serves {category} {version}")
        if stack.processes["worker"].pid != worker_pid:
            raise RuntimeError("the extraction worker was restarted: the swap was not hot")

        print("\n== 5. extraction of the same products with the fine-tuned models")
        after = extract_and_wait(settings, held_out, held_out_uris)
        tuned_accuracy = print_table(held_out, after)
        print(f"\naccuracy on held-out sample products: zero-shot {zero_shot_accuracy:.2f} → fine-tuned {tuned_accuracy:.2f}")
        example = after[held_out[0].product_id]
        print("\nexample result file", f"s3://{settings.bucket}/{result_key(settings.results_prefix, held_out[0].category, held_out[0].product_id)}:")
        print(json.dumps(example, indent=2))
    print("dev stack down")
    return 0
