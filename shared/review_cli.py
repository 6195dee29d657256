"""`shelfsight review list|export`: the review queue for a data team. Loads neither the worker nor
the trainer; reads the review stream (Redis) and, unless --include-labeled, the label log (S3).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import redis

from shelfsight.shared.cli import EXIT_OK, EXIT_USAGE, echo_json, json_option, pass_settings
from shelfsight.shared.review import ReviewItem
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import StorageError

_UNREACHABLE = (redis.RedisError, OSError, StorageError)

_EPILOG = ("Exit codes: 0 done (an empty queue included); 2 unusable option or unreachable Redis/S3. "
           "Order: most uncertain first (margin of the least decided attribute), ties to the older request; "
           "one entry per product (the latest); products labeled since their entry are left out.")


@click.group(epilog=_EPILOG)
def review() -> None:
    """The review queue: results to label next, most informative first."""


def _queue(settings: Settings, category: str | None, limit: int, include_labeled: bool) -> list[ReviewItem]:
    """The ordered queue from the review stream, labeled products left out unless asked."""
    from shelfsight.shared.review import latest_label_times, read_review_stream, review_queue
    from shelfsight.shared.storage import S3ObjectStore
    from shelfsight.shared.streams import redis_client

    items, skipped = read_review_stream(redis_client(settings), settings.review_stream)
    for entry_id, reason in skipped:
        click.echo(f"review stream entry {entry_id} skipped: {reason}", err=True)
    labeled = {}
    if not include_labeled and items:
        categories = {i.category for i in items if category is None or i.category == category}
        labeled = latest_label_times(S3ObjectStore(settings), settings.bucket, settings.labels_prefix, categories)
    return review_queue(items, category=category, limit=limit or None, labeled_at=labeled)


def _options(command: Callable[..., int]) -> Callable[..., int]:
    command = click.option("--include-labeled", is_flag=True,
                           help="Keep products that were labeled after their entry (skips reading the label log).")(command)
    command = click.option("--limit", type=click.IntRange(min=0), default=0,
                           help="At most this many products (the labeling budget); 0: all.")(command)
    return click.option("--category", default=None, help="Only this category.")(command)


@review.command("list", epilog=_EPILOG)
@_options
@json_option
@pass_settings
def review_list(settings: Settings, category: str | None, limit: int, include_labeled: bool, as_json: bool) -> int:
    """Print the review queue: uncertainty, product, and the attributes in doubt."""
    try:
        queue = _queue(settings, category, limit, include_labeled)
    except _UNREACHABLE as exc:
        click.echo(f"review list: cannot read the review stream or the label log: {exc}", err=True)
        return EXIT_USAGE
    if as_json:
        echo_json([item.as_dict() for item in queue])
        return EXIT_OK
    click.echo(f"{'#':>4} {'uncertainty':>11}  {'category':<12} {'product':<24} {'submitted_at':<25}  in doubt")
    for rank, item in enumerate(queue, start=1):
        doubt = ", ".join(f"{name}={item.attributes[name].value} ({item.attributes[name].confidence:.2f})"
                          for name in item.review_attributes)
        click.echo(f"{rank:>4} {item.uncertainty:>11.4f}  {item.category:<12} {item.product_id:<24} "
                   f"{item.submitted_at.isoformat():<25}  {doubt}")
    click.echo(f"{len(queue)} product(s) to review", err=True)
    return EXIT_OK


def _presigner(settings: Settings, seconds: int) -> Callable[[str], str]:
    """s3:// URI -> a presigned GET URL valid `seconds` (signed locally, no request is sent)."""
    import boto3

    from shelfsight.shared.events import parse_s3_uri

    client = boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
        aws_secret_access_key=(settings.s3_secret_access_key.get_secret_value()
                               if settings.s3_secret_access_key else None),
    )

    def presign(uri: str) -> str:
        bucket, key = parse_s3_uri(uri)
        return str(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=seconds))

    return presign


@review.command("export", epilog=_EPILOG + " Files: <out>/<category>.tasks.json (import into a Label Studio "
                "project) and <out>/<category>.config.xml (that project's labeling config), or "
                "<out>/<category>.jsonl with --format jsonl.")
@_options
@click.option("--format", "fmt", type=click.Choice(["label-studio", "jsonl"]), default="label-studio",
              show_default=True, help="label-studio: tasks with the predictions as pre-annotations, and the "
              "labeling config; jsonl: the queue entries, one per line.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("review-export"),
              show_default=True, help="Directory to write into (created if missing).")
@click.option("--presign", type=click.IntRange(min=1, max=7 * 24 * 3600), default=None, metavar="SECONDS",
              help="Put a presigned https URL valid this long in data.image (default: the s3:// URI, which "
                   "Label Studio loads through an S3 source storage connected to the project).")
@json_option
@pass_settings
def review_export(settings: Settings, category: str | None, limit: int, include_labeled: bool, fmt: str,
                  out: Path, presign: int | None, as_json: bool) -> int:
    """Write the review queue for a labeling tool; one project (file set) per category."""
    from shelfsight.shared.review import label_studio_export
    from shelfsight.shared.taxonomy import load_taxonomy

    try:
        queue = _queue(settings, category, limit, include_labeled)
    except _UNREACHABLE as exc:
        click.echo(f"review export: cannot read the review stream or the label log: {exc}", err=True)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, object]] = {}
    if fmt == "jsonl":
        by_category: dict[str, list[ReviewItem]] = {}
        for item in queue:
            by_category.setdefault(item.category, []).append(item)
        for name, items in sorted(by_category.items()):
            path = out / f"{name}.jsonl"
            path.write_text("".join(json.dumps(i.as_dict()) + "\n" for i in items))
            written[name] = {"tasks": len(items), "file": str(path)}
    else:
        image_url = _presigner(settings, presign) if presign else None
        for project in label_studio_export(queue, load_taxonomy(settings.taxonomy_path), image_url):
            tasks_path, config_path = out / f"{project.category}.tasks.json", out / f"{project.category}.config.xml"
            tasks_path.write_text(json.dumps(project.tasks, indent=1) + "\n")
            config_path.write_text(project.config)
            written[project.category] = {"tasks": len(project.tasks), "file": str(tasks_path),
                                         "config": str(config_path)}
    if as_json:
        echo_json({"format": fmt, "out": str(out), "categories": written})
    else:
        for name, info in written.items():
            click.echo(f"{name}: {info['tasks']} task(s) -> {info['file']}"
                       + (f" (labeling config {info['config']})" if "config" in info else ""))
        if not written:
            click.echo("the review queue is empty: nothing written", err=True)
    return EXIT_OK
