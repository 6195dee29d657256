"""`shelfsight backfill`: re-extract a category's products at its serving version, behind live uploads."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from shelfsight.shared.cli import EXIT_OK, EXIT_USAGE, echo_json, json_option, pass_settings
from shelfsight.shared.settings import Settings

_RATE = re.compile(r"^\s*(?P<n>\d+(\.\d*)?|\.\d+)\s*(/\s*s)?\s*$")


class RateType(click.ParamType):
    """`50` or `50/s`: products per second, positive."""

    name = "N/s"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            rate = float(value)
        else:
            match = _RATE.match(str(value))
            if not match:
                self.fail(f"{value!r} is not a rate: write N or N/s, e.g. 50/s", param, ctx)
            rate = float(match["n"])
        if rate <= 0:
            self.fail(f"the rate must be positive, got {value!r}", param, ctx)
        return rate


@click.command(epilog="Exit codes: 0 planned (every stale result enqueued); 2 usage error (unknown category).")
@click.option("--category", required=True, help="The category to re-extract.")
@click.option("--stale-only", is_flag=True,
              help="Skip results already at the serving version (what makes a re-run cheap and resumable).")
@click.option("--rate", type=RateType(), default=None,
              help="Enqueue at most N products per second [default: SHELFSIGHT_BACKFILL_RATE_PER_S].")
@click.option("--max-queued", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Pause while this many re-extractions wait in the backfill queue (0: no limit).")
@click.option("--start-after", metavar="PRODUCT_ID", default="",
              help="Resume after this product (results are taken in key order; the summary names the last).")
@json_option
@pass_settings
def backfill(settings: Settings, category: str, stale_only: bool, rate: float | None, max_queued: int,
             start_after: str, as_json: bool) -> int:
    """Re-extract every product of CATEGORY that has a result, at the version it serves now.

    Events go to the backfill queue (SHELFSIGHT_BACKFILL_QUEUE), which workers take from only
    when no live upload waits. Each keeps its product's image and original submitted_at, so a
    newer upload's result is never replaced. Run it again with --stale-only after an interruption:
    what is already at the serving version is skipped.
    """
    from shelfsight.shared.backfill import Backfill, BackfillStats, target_version
    from shelfsight.shared.celery_app import create_celery_app
    from shelfsight.shared.events import result_key
    from shelfsight.shared.registry import ModelRegistry
    from shelfsight.shared.storage import S3ObjectStore
    from shelfsight.shared.streams import redis_client
    from shelfsight.shared.taxonomy import load_taxonomy

    try:
        load_taxonomy(settings.taxonomy_path).category(category)
    except KeyError as exc:
        click.echo(f"backfill: {exc.args[0]}", err=True)
        return EXIT_USAGE
    store = S3ObjectStore(settings)
    target = target_version(ModelRegistry(store, settings.bucket, settings.models_prefix), category)
    app = create_celery_app(settings)
    runner = Backfill(app, store, redis_client(settings), settings, rate or settings.backfill_rate_per_s,
                      max_queued=max_queued)
    after = result_key(settings.results_prefix, category, start_after) if start_after else ""
    bar = _ProgressLine(enabled=not as_json)
    try:
        stats: BackfillStats = runner.run(category, target, stale_only=stale_only, start_after=after,
                                          progress=bar.update)
    finally:
        bar.close()
        app.close()
    summary = stats.as_dict() | {"stale_only": stale_only, "queue": settings.backfill_queue}
    if as_json:
        echo_json(summary)
    else:
        last = stats.last_key.rsplit("/", 1)[-1].removesuffix(".json")
        click.echo(f"{category}: {stats.checked} results checked, {stats.enqueued} enqueued to "
                   f"{settings.backfill_queue!r} for {target}, {stats.current} already at it, "
                   f"{stats.unreadable} unreadable" + (f"; last product {last}" if last else ""))
    return EXIT_OK


class _ProgressLine:
    """One self-rewriting line on stderr, only on a terminal (logs and pipes get the summary only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def update(self, stats: Any) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * stats.checked / stats.total) if stats.total else width
        sys.stderr.write(f"\r{stats.category} [{'#' * done}{'.' * (width - done)}] {stats.checked}/{stats.total} "
                         f"checked, {stats.enqueued} enqueued")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
