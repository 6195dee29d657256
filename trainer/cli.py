"""`shelfsight trainer|labels|train|models`: the trainer side of the command line.

`labels import` runs in the CLI process itself (it only needs S3 and Redis), so the line-numbered
rejections come back at once; the IMPORT_LABELS_TASK does the same for remote callers.
`train` enqueues on the training queue; `--wait` follows the task's PROGRESS states.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.cli import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    echo_json,
    json_option,
    pass_settings,
)
from shelfsight.shared.settings import Settings


@click.command()
@click.option("--hostname", default="trainer@%h", show_default=True, help="Celery node name.")
@pass_settings
def trainer(settings: Settings, hostname: str) -> int:
    """Run the trainer worker: training queue, solo pool (one run at a time, owns the GPU).

    Celery beat is embedded when SHELFSIGHT_RETRAIN_SCHEDULE_S is set.
    """
    from shelfsight.shared.observability import serve_metrics
    from shelfsight.trainer.app import create_trainer_app

    quiet = ["--quiet"] if settings.log_format == "json" else []  # no banner: every line is JSON
    argv = [*quiet, "worker", "--pool", "solo", "--queues", settings.training_queue, "--hostname", hostname,
            "--without-mingle", "--without-gossip", "--loglevel", settings.log_level]
    if settings.retrain_schedule_s > 0:
        argv.append("--beat")
    app = create_trainer_app(settings)
    serve_metrics(settings)  # shelfsight_training_* (solo pool: runs happen in this process)
    app.start(argv)
    return 0


# --- labels ---------------------------------------------------------------------------------------


@click.group()
def labels() -> None:
    """Labeled products: import them (JSON lines, CSV, or a Label Studio JSON export)."""


def _read_label_file(path: str, settings: Settings) -> bytes | str:
    """Local file or stdin bytes (size-checked), or an s3:// URI passed through."""
    from shelfsight.trainer.labels import LabelFileTooLarge

    limit = settings.max_label_file_bytes
    if path.startswith("s3://"):
        return path
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        size = Path(path).stat().st_size
        if size > limit:
            raise LabelFileTooLarge(f"{path} is {size} bytes; the limit is {limit} "
                                    "(SHELFSIGHT_MAX_LABEL_FILE_BYTES). Split it into smaller files.")
        data = Path(path).read_bytes()
    if len(data) > limit:
        raise LabelFileTooLarge(f"{path} exceeds {limit} bytes; split it")
    return data


def _label_format(file: str, given: str | None) -> str:
    """--format, else from the name: .csv is CSV, .json a Label Studio export, anything else JSONL."""
    if given:
        return given
    suffix = Path(file).suffix.lower()
    return {".csv": "csv", ".json": "label-studio"}.get(suffix, "jsonl")


def _where(file: str, rejection: dict[str, Any], label_format: str) -> str:
    if label_format == "label-studio":
        task_id = rejection.get("task_id")
        return f"{file}: task {rejection['line']}" + (f" (id {task_id})" if task_id is not None else "")
    return f"{file}:{rejection['line']}"


@labels.command("import", epilog="Exit codes: 0 all stored; 1 some lines rejected (the valid ones "
                "are stored); 2 the file could not be read or is too large. Formats: docs/labeling.md.")
@click.argument("file")
@click.option("--format", "label_format", type=click.Choice(["jsonl", "csv", "label-studio"]), default=None,
              help="jsonl: one label per line; csv: product_id,category,image[,group_id][,labeled_at] and one "
                   "column per attribute; label-studio: a Label Studio JSON export. Default: from FILE's "
                   "extension (.csv, .json), else jsonl.")
@json_option
@pass_settings
def import_labels(settings: Settings, file: str, label_format: str | None, as_json: bool) -> int:
    """Validate and append labels from FILE ('-' for stdin, or s3://bucket/key).

    Every rejected line (CSV row, Label Studio task) is listed on stderr with where it is and why.
    A category that reaches SHELFSIGHT_RETRAIN_AFTER_LABELS new labels gets a retrain enqueued.
    """
    from shelfsight.trainer.labels import LabelFileTooLarge
    from shelfsight.trainer.resources import TrainerResources
    from shelfsight.trainer.service import import_and_trigger

    fmt = _label_format(file, label_format)
    try:
        source = _read_label_file(file, settings)
        summary = import_and_trigger(TrainerResources.build(settings), source, app=create_celery_app(settings),
                                     label_format=fmt)
    except (OSError, LabelFileTooLarge, ValueError) as exc:
        click.echo(f"labels not imported: {exc}", err=True)
        return EXIT_USAGE
    for rejection in summary["rejections"]:
        click.echo(f"{_where(file, rejection, fmt)}: rejected: {rejection['reason']}", err=True)
    if as_json:
        echo_json({k: v for k, v in summary.items() if k != "rejections"})
    else:
        per_category = ", ".join(f"{c}: {n}" for c, n in sorted(summary["per_category"].items()))
        click.echo(f"accepted {summary['accepted']}, rejected {summary['rejected']}"
                   + (f" ({per_category})" if per_category else ""))
        for category, retrain in sorted(summary["retrain"].items()):
            state = "enqueued" if retrain["queued"] else "already pending"
            click.echo(f"retrain {category}: {state}, task {retrain['task_id']}")
    if summary["rejected"]:
        click.echo(f"{summary['rejected']} line(s) rejected; the {summary['accepted']} valid label(s) were "
                   "stored. Fix the rejected lines and import just those again.", err=True)
        return EXIT_REJECTED
    return EXIT_OK


# --- train ----------------------------------------------------------------------------------------


class _ProgressBar:
    """A tqdm bar over training steps, with phase, epoch and losses as its postfix."""

    def __init__(self, category: str) -> None:
        from tqdm import tqdm

        self.bar: Any = tqdm(total=0, desc=f"train {category}", unit="step", file=sys.stderr)

    def update(self, meta: dict[str, Any]) -> None:
        if meta.get("total_steps"):
            self.bar.total = meta["total_steps"]
        if "global_step" in meta:
            self.bar.n = meta["global_step"]
        postfix = {"phase": meta.get("phase"), "epoch": f"{meta.get('epoch', '-')}/{meta.get('epochs', '-')}"}
        for key in ("loss", "val_loss"):
            if key in meta:
                postfix[key] = f"{meta[key]:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def wait_for(app: Any, task_id: str, category: str, poll_s: float = 0.5,
             timeout_s: float | None = None) -> tuple[int, Any]:
    """Poll the task, drawing progress, until it finishes: (exit code, its result or None)."""
    result = app.AsyncResult(task_id)
    bar = _ProgressBar(category)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while not result.ready():
            if result.state == "PROGRESS" and isinstance(result.info, dict):
                bar.update(result.info)
            if deadline and time.monotonic() > deadline:
                click.echo(f"still running after {timeout_s}s: task {task_id}", err=True)
                return EXIT_REJECTED, None
            time.sleep(poll_s)
    finally:
        bar.close()
    if result.failed():
        click.echo(f"training {task_id} failed: {result.result!r}", err=True)
        return EXIT_REJECTED, None
    outcome = result.result
    ok = isinstance(outcome, dict) and outcome.get("status") != "skipped"
    return (EXIT_OK if ok else EXIT_REJECTED), outcome


def _describe_run(outcome: dict[str, Any]) -> str:
    if outcome.get("status") == "skipped":
        return f"skipped: {outcome.get('reason')}"
    return (f"{outcome['status']} {outcome['category']} {outcome['version']} "
            f"(test macro-F1 {outcome['test_macro_f1']:.4f}): {outcome['reason']}\nreport: {outcome['report']}")


@click.command(epilog="Exit codes: 0 enqueued (with --wait: the run finished); 1 a training is already "
               "pending, or the followed run failed or was skipped; 2 unknown category.")
@click.option("--category", required=True, help="The category to fine-tune.")
@click.option("--template", default=None, help="Caption template, e.g. 'a photo of a top, {}' (default: bare values).")
@click.option("--wait", is_flag=True, help="Follow the run with a progress bar until it ends; print its outcome.")
@click.option("--timeout", type=float, default=0, help="With --wait: give up waiting after this many seconds.")
@json_option
@pass_settings
def train(settings: Settings, category: str, template: str | None, wait: bool, timeout: float,
          as_json: bool) -> int:
    """Enqueue a fine-tuning run for a category (prints the task id)."""
    import redis

    from shelfsight.shared.taxonomy import load_taxonomy
    from shelfsight.shared.training_jobs import enqueue_training

    app = create_celery_app(settings)
    try:
        enqueued = enqueue_training(app, redis.Redis.from_url(settings.broker_url),
                                    load_taxonomy(settings.taxonomy_path), category,
                                    caption_template=template, reason="cli")
    except KeyError as exc:
        click.echo(f"not enqueued: {exc.args[0]}", err=True)
        return EXIT_USAGE
    if not enqueued.queued:
        click.echo(f"a training for {category} is already queued or running: task {enqueued.task_id}"
                   + ("; following it" if wait else ""), err=True)
    elif not wait:
        if as_json:
            echo_json({"task_id": enqueued.task_id, "category": category, "queued": True})
        else:
            click.echo(enqueued.task_id)
    if not wait:
        return EXIT_OK if enqueued.queued else EXIT_REJECTED
    code, outcome = wait_for(app, enqueued.task_id, category, timeout_s=timeout or None)
    if outcome is not None:
        echo_json(outcome) if as_json else click.echo(_describe_run(outcome))
    return code


# --- models ---------------------------------------------------------------------------------------


@click.group(epilog=EXIT_CODES_HELP)
def models() -> None:
    """The model registry: list, show, promote, rollback."""


def _registry(settings: Settings) -> Any:
    from shelfsight.shared.registry import ModelRegistry
    from shelfsight.shared.storage import S3ObjectStore

    return ModelRegistry(S3ObjectStore(settings), settings.bucket, settings.models_prefix)


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


def _refusal(command: str, exc: Exception) -> int:
    click.echo(f"models {command}: {exc}", err=True)
    return EXIT_REJECTED


@models.command("list")
@json_option
@pass_settings
def models_list(settings: Settings, as_json: bool) -> int:
    """Categories with their serving version and test metrics."""
    rows = list_models(_registry(settings))
    if as_json:
        echo_json(rows)
        return EXIT_OK
    click.echo(f"{'category':<16} {'serving':<26} {'versions':>8} {'test macro-F1':>14}  reason")
    for row in rows:
        f1 = row.get("test_macro_f1")
        click.echo(f"{row['category']:<16} {row['current'] or '-':<26} {row['versions']:>8} "
                   f"{'-' if f1 is None else f'{f1:.4f}':>14}  {row.get('reason') or ''}")
    return EXIT_OK


@models.command("show")
@click.argument("category")
@click.argument("version", required=False)
@json_option
@pass_settings
def models_show(settings: Settings, category: str, version: str | None, as_json: bool) -> int:
    """Print a version's manifest (default: the serving version), and for the serving version how
    many results another version wrote (stale_results; reads every result of the category)."""
    from shelfsight.shared.backfill import count_stale
    from shelfsight.shared.storage import ObjectMissing

    registry = _registry(settings)
    try:
        pointer = registry.current(category)
        if version is None:
            if pointer is None:
                raise ValueError(f"{category} has no promoted model; pass a VERSION (see `shelfsight models list`)")
            version = str(pointer.version)
        manifest = registry.manifest(category, version).model_dump(mode="json")
    except (ObjectMissing, ValueError) as exc:
        return _refusal("show", exc)
    stale = None
    if pointer is not None and pointer.version == version:  # the serving version: how many results lag it
        stale, total = count_stale(registry.store, settings, category, version)
        manifest["stale_results"] = {"stale": stale, "total": total}
    if as_json:
        echo_json(manifest)
        return EXIT_OK
    for line in describe_manifest(manifest):
        click.echo(line)
    if stale is not None:
        click.echo(f"{'stale_results':<20} {stale} of {total}"
                   + (f" (run `shelfsight backfill --category {category} --stale-only`)" if stale else ""))
    return EXIT_OK


_SHOWN = ("category", "version", "architecture", "base_weights", "base_weights_sha256", "taxonomy_version",
          "created_at", "parent_version", "weights_sha256", "test_set_key", "test_set_sha256", "image_size",
          "framing", "precision", "device", "split_seed", "train_seed")


def describe_manifest(manifest: dict[str, Any]) -> list[str]:
    """`models show` lines: what the version is, how to reproduce it, and why it was (not) promoted."""
    lines = [f"{key:<20} {manifest.get(key)}" for key in _SHOWN]
    software = manifest.get("software") or {}
    lines.append(f"{'software':<20} " + (", ".join(f"{k} {v}" for k, v in software.items()) or "None"))
    metrics = manifest.get("metrics", {})
    lines.append(f"{'test macro-F1':<20} {metrics.get('test_macro_f1')}")
    lines.append(f"{'test accuracy':<20} {metrics.get('test_accuracy')}")
    decision = metrics.get("decision") or {}
    lines.append(f"{'decision':<20} {decision.get('reason')}")
    mean = (decision.get("bootstrap") or {}).get("mean")
    if mean:
        lines.append(f"{'macro-F1 gain':<20} {mean['delta']:+.4f} (interval {mean['lower']:+.4f} to "
                     f"{mean['upper']:+.4f}) over {decision.get('champion_version')}")
    for attribute, delta in (decision.get("attribute_deltas") or {}).items():
        lines.append(f"{'  ' + attribute:<20} {delta:+.4f}")
    return lines + _describe_calibration(manifest)


def _describe_calibration(manifest: dict[str, Any]) -> list[str]:
    """Per attribute: the temperature workers serve with, the review threshold, test ECE before → after."""
    calibration = manifest.get("calibration") or {}
    if not calibration:
        return [f"{'calibration':<20} None (T = 1, never reviewed: trained before calibration)"]
    lines = [f"{'calibration':<20} target precision {calibration.get('target_precision')}, "
             f"mean test ECE {_num(calibration.get('ece_before'))} -> {_num(calibration.get('ece_after'))}"]
    thresholds = manifest.get("review_thresholds") or {}
    for attribute, entry in (calibration.get("attributes") or {}).items():
        threshold = thresholds.get(attribute)
        review = "never reviewed" if threshold is None else (
            "always reviewed" if threshold > 1 else f"review below {threshold:.3f}")
        lines.append(f"{'  ' + attribute:<20} T={_num(entry.get('temperature'))}, {review}, test ECE "
                     f"{_num(entry.get('ece_before'))} -> {_num(entry.get('ece_after'))} ({entry.get('status')})")
    return lines


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_pointer(category: str, pointer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json({"category": category, **pointer})
    else:
        click.echo(f"{category} now serves {pointer['version']} ({pointer.get('reason')})")


@models.command("promote")
@click.argument("category")
@click.argument("version")
@click.option("--reason", default="manual promotion", show_default=True, help="Recorded with the promotion.")
@json_option
@pass_settings
def models_promote(settings: Settings, category: str, version: str, reason: str, as_json: bool) -> int:
    """Serve VERSION now and announce it to the workers."""
    from shelfsight.shared.storage import ObjectMissing
    from shelfsight.trainer.resources import TrainerResources
    from shelfsight.trainer.service import promote_version

    try:
        pointer = promote_version(TrainerResources.build(settings), category, version, reason=reason)
    except (ObjectMissing, ValueError) as exc:
        return _refusal("promote", exc)
    _print_pointer(category, pointer, as_json)
    return EXIT_OK


@models.command("rollback")
@click.argument("category")
@json_option
@pass_settings
def models_rollback(settings: Settings, category: str, as_json: bool) -> int:
    """Serve the previously served version again, and announce it."""
    from shelfsight.shared.storage import ObjectMissing
    from shelfsight.trainer.resources import TrainerResources
    from shelfsight.trainer.service import rollback_category

    try:
        pointer = rollback_category(TrainerResources.build(settings), category)
    except (ObjectMissing, ValueError) as exc:
        return _refusal("rollback", exc)
    _print_pointer(category, pointer, as_json)
    return EXIT_OK
