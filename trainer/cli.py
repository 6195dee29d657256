"""`shelfsight labels|train|models`: the trainer side of the command line.

`labels import` runs in the CLI process itself (it only needs S3 and Redis), so the line-numbered
rejections come back at once; the IMPORT_LABELS_TASK does the same for remote callers.
`train` enqueues on the training queue; `--wait` follows the task's PROGRESS states.

Exit codes: 0 success; 1 something was rejected or refused (bad label lines — the good ones
are still stored —, a training already pending, a challenger that failed); 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shared.settings import Settings

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def _print_json(payload: object) -> None:
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _resources(settings: Settings):  # noqa: ANN202 - lazy import keeps `shelfsight --help` fast
    from trainer.service import resources_for

    return resources_for(settings)


def _app(settings: Settings):  # noqa: ANN202
    from worker.celery_app import create_celery_app

    return create_celery_app(settings)


# --- labels ---------------------------------------------------------------------------------------


def _read_label_file(path: str, settings: Settings) -> bytes | str:
    """Local file or stdin bytes (size-checked), or an s3:// URI passed through."""
    from trainer.labels import LabelFileTooLarge

    if path.startswith("s3://"):
        return path
    if path == "-":
        data = sys.stdin.buffer.read(settings.max_label_file_bytes + 1)
    else:
        file = Path(path)
        if file.stat().st_size > settings.max_label_file_bytes:
            raise LabelFileTooLarge(
                f"{path} is {file.stat().st_size} bytes; the limit is {settings.max_label_file_bytes} "
                "(SHELFSIGHT_MAX_LABEL_FILE_BYTES). Split it into smaller files."
            )
        data = file.read_bytes()
    if len(data) > settings.max_label_file_bytes:
        raise LabelFileTooLarge(f"{path} exceeds {settings.max_label_file_bytes} bytes; split it")
    return data


def cmd_labels(args: argparse.Namespace, settings: Settings) -> int:
    """`labels import FILE`: validate, store the good lines, list every rejected line."""
    from trainer.labels import LabelFileTooLarge
    from trainer.service import import_and_trigger

    try:
        source = _read_label_file(args.file, settings)
        summary = import_and_trigger(_resources(settings), source, app=_app(settings))
    except (OSError, LabelFileTooLarge, ValueError) as exc:
        print(f"labels not imported: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for rejection in summary["rejections"]:
        print(f"{args.file}:{rejection['line']}: rejected: {rejection['reason']}", file=sys.stderr)
    _print_json({k: v for k, v in summary.items() if k != "rejections"})
    if summary["rejected"]:
        print(f"{summary['rejected']} line(s) rejected; the {summary['accepted']} valid label(s) were stored. "
              "Fix the rejected lines and import just those again.", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


# --- train ----------------------------------------------------------------------------------------


class _Bar:
    """tqdm progress bar when available, else one line per epoch on stderr."""

    def __init__(self, category: str) -> None:
        self.category = category
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=0, desc=f"train {category}", unit="step", file=sys.stderr)
        except ImportError:
            self.bar = None
        self.epoch = 0

    def update(self, meta: dict[str, Any]) -> None:
        phase = meta.get("phase")
        if self.bar is not None:
            if meta.get("total_steps"):
                self.bar.total = meta["total_steps"]
            if "global_step" in meta:
                self.bar.n = meta["global_step"]
            postfix = {"phase": phase, "epoch": f"{meta.get('epoch', '-')}/{meta.get('epochs', '-')}"}
            for key in ("loss", "val_loss"):
                if key in meta:
                    postfix[key] = f"{meta[key]:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()
        elif phase == "epoch" and meta.get("epoch") != self.epoch:
            self.epoch = meta["epoch"]
            print(f"epoch {meta['epoch']}/{meta['epochs']} train_loss {meta['train_loss']:.4f} "
                  f"val_loss {meta['val_loss']:.4f}", file=sys.stderr)
        elif phase != "step" and phase is not None:
            print(f"{self.category}: {phase}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_for(app: Any, task_id: str, category: str, poll_s: float = 0.5, timeout_s: float | None = None) -> int:
    """Poll the task, drawing progress, until it finishes; print its result. Returns an exit code."""
    result = app.AsyncResult(task_id)
    bar = _Bar(category)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while not result.ready():
            if result.state == "PROGRESS" and isinstance(result.info, dict):
                bar.update(result.info)
            if deadline and time.monotonic() > deadline:
                print(f"still running after {timeout_s}s: task {task_id}", file=sys.stderr)
                return EXIT_REJECTED
            time.sleep(poll_s)
    finally:
        bar.close()
    if result.failed():
        print(f"training {task_id} failed: {result.result!r}", file=sys.stderr)
        return EXIT_REJECTED
    _print_json(result.result)
    return EXIT_OK if isinstance(result.result, dict) and result.result.get("status") != "skipped" else EXIT_REJECTED


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Enqueue a training (prints the task id); --wait draws its progress until it finishes."""
    from trainer.service import enqueue_training

    app = _app(settings)
    try:
        enqueued = enqueue_training(app, _resources(settings), args.category, caption_template=args.template,
                                    reason="cli")
    except KeyError as exc:
        print(f"not enqueued: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if not enqueued.queued:
        print(f"a training for {args.category} is already queued or running: task {enqueued.task_id}"
              + ("; following it" if args.wait else ""), file=sys.stderr)
    else:
        print(enqueued.task_id)
    if args.wait:
        return wait_for(app, enqueued.task_id, args.category, timeout_s=args.timeout or None)
    return EXIT_OK if enqueued.queued else EXIT_REJECTED


# --- models ---------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """`models list|show|promote|rollback`."""
    from shared.storage import ObjectMissing
    from trainer.service import promote_version, rollback_category

    resources = _resources(settings)
    registry = resources.registry
    try:
        if args.models_command == "list":
            _print_json(list_models(registry))
        elif args.models_command == "show":
            version = args.version or _current_version(registry, args.category)
            _print_json(registry.manifest(args.category, version).model_dump(mode="json"))
        elif args.models_command == "promote":
            _print_json(promote_version(resources, args.category, args.version, reason=args.reason))
        elif args.models_command == "rollback":
            _print_json(rollback_category(resources, args.category))
    except (ObjectMissing, ValueError) as exc:
        print(f"models {args.models_command}: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


def _current_version(registry: Any, category: str) -> str:
    pointer = registry.current(category)
    if pointer is None:
        raise ValueError(f"{category} has no promoted model; pass a VERSION (see `shelfsight models list`)")
    return str(pointer.version)


def list_models(registry: Any) -> list[dict[str, Any]]:
    """Per category: serving version, its test metrics, and how many versions exist."""
    rows = []
    for category in registry.categories():
        pointer = registry.current(category)
        row: dict[str, Any] = {"category": category, "current": pointer.version if pointer else None,
                               "versions": len(registry.versions(category))}
        if pointer:
            manifest = registry.manifest(category, pointer.version)
            row.update(test_macro_f1=manifest.metrics.get("test_macro_f1"),
                       test_accuracy=manifest.metrics.get("test_accuracy"),
                       promoted_at=pointer.updated_at, reason=pointer.reason)
        rows.append(row)
    return rows


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    """Add the labels, train and models commands to the `shelfsight` parser."""
    p = sub.add_parser("labels", help="import labels (JSONL, one label per line)")
    labels_sub = p.add_subparsers(dest="labels_command", required=True)
    imp = labels_sub.add_parser(
        "import", help="validate and append labels; exits 1 if any line was rejected (the good ones are stored)"
    )
    imp.add_argument("file", help="JSONL file, '-' for stdin, or s3://bucket/key")
    handlers["labels"] = cmd_labels

    p = sub.add_parser("train", help="enqueue a fine-tuning run for a category")
    p.add_argument("--category", required=True)
    p.add_argument("--template", default=None, help="caption template, e.g. 'a photo of a top, {}'")
    p.add_argument("--wait", action="store_true", help="follow the run with a progress bar until it ends")
    p.add_argument("--timeout", type=float, default=0, help="with --wait: give up waiting after this many seconds")
    handlers["train"] = cmd_train

    p = sub.add_parser("models", help="the model registry: list, show, promote, rollback")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="categories with their serving version and test metrics")
    show = models_sub.add_parser("show", help="print a manifest (default: the serving version)")
    show.add_argument("category")
    show.add_argument("version", nargs="?")
    promote = models_sub.add_parser("promote", help="serve VERSION now and announce it to the workers")
    promote.add_argument("category")
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual promotion")
    rollback = models_sub.add_parser("rollback", help="serve the previously served version again")
    rollback.add_argument("category")
    handlers["models"] = cmd_models
