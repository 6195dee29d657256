"""`shelfsight demo`: the whole service on an embedded stack, with sample products.

Brings up Redis, an S3 server, a worker and Flower; uploads generated tops and pans;
enqueues them; reads the features back from the S3 result files; tears everything down.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from shared.devstack import start_stack
from shared.events import result_key
from shared.samples import SampleProduct, generate_products, upload_products
from shared.settings import Settings
from shared.storage import S3ObjectStore


def _stack_settings(env: dict[str, str]) -> Settings:
    os.environ.update(env)
    return Settings()


def extract_and_wait(settings: Settings, products: list[SampleProduct], uris: list[str], timeout_s: float = 300) -> dict[str, dict]:
    """Enqueue every product and wait for its result file; returns results by product id."""
    from worker.celery_app import create_celery_app
    from worker.enqueue import enqueue_upload

    app = create_celery_app(settings)
    store = S3ObjectStore(settings)
    for product, uri in zip(products, uris, strict=True):
        enqueue_upload(app, product_id=product.product_id, category=product.category, image=uri)
    pending = {p.product_id: p for p in products}
    results: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for pid, product in list(pending.items()):
            key = result_key(settings.results_prefix, product.category, pid)
            if store.exists(settings.bucket, key):
                results[pid] = json.loads(store.get(settings.bucket, key).body)
                del pending[pid]
        time.sleep(0.2)
    if pending:
        raise TimeoutError(f"no result after {timeout_s}s for {sorted(pending)}; see the worker log")
    return results


def print_table(products: list[SampleProduct], results: dict[str, dict]) -> float:
    """One row per product: each attribute as predicted (confidence), marked ✗ where it is wrong."""
    rows, right, total = [], 0, 0
    for product in products:
        result = results[product.product_id]
        cells = []
        for attr, truth in product.attributes.items():
            got = result["attributes"][attr]
            ok = got["value"] == truth
            right, total = right + ok, total + 1
            cells.append(f"{attr}={got['value']} ({got['confidence']:.2f}){'' if ok else ' ✗ truth ' + truth}")
        rows.append(f"{product.product_id:<16} {product.category:<5} {result['model']['version']:<24} " + "; ".join(cells))
    print(f"{'product':<16} {'cat':<5} {'model version':<24} extracted features")
    print("\n".join(rows))
    accuracy = right / total if total else 0.0
    print(f"attribute accuracy against the images' known truth: {right}/{total} = {accuracy:.2f}")
    return accuracy


def run_demo(state_dir: Path, per_category: int = 6) -> int:
    """The `make demo` job. Returns a process exit code."""
    with start_stack(state_dir, worker=True, trainer=False, flower=True) as stack:
        settings = _stack_settings(stack.env)
        print("dev stack up:", ", ".join(f"{k}=127.0.0.1:{v}" for k, v in stack.ports.items()))
        store = S3ObjectStore(settings)
        products = generate_products("tops", per_category, seed=101) + generate_products("pans", per_category, seed=202)
        uris = upload_products(products, store, settings.bucket, prefix="uploads")
        results = extract_and_wait(settings, products, uris)
        print_table(products, results)
        example = results[products[0].product_id]
        print("\nexample result file", f"s3://{settings.bucket}/{result_key(settings.results_prefix, products[0].category, products[0].product_id)}:")
        print(json.dumps(example, indent=2))
    print("dev stack down")
    return 0
