"""`shelfsight worker` and `shelfsight dead-letters`: the extraction side of the command line."""

from __future__ import annotations

from typing import Any

import click

from shelfsight.shared.cli import echo_json, json_option, pass_settings
from shelfsight.shared.settings import Settings


@click.command()
@click.option("--concurrency", type=int, default=0,
              help="Task threads; 0 uses SHELFSIGHT_WORKER_CONCURRENCY (default 2 × batch size).")
@click.option("--hostname", default="extract@%h", show_default=True,
              help="Celery node name (process i of several: <name>-i@<host>).")
@click.option("--processes", type=int, default=0,
              help="Extraction processes sharing this machine's device, supervised; 0 uses "
                   "SHELFSIGHT_WORKER_PROCESSES (default 1).")
@click.option("--process-index", type=int, default=None, hidden=True,
              help="Set by the supervisor: this process is number i of --processes.")
@pass_settings
def worker(settings: Settings, concurrency: int, hostname: str, processes: int, process_index: int | None) -> int:
    """Run an extraction worker: threads pool (CUDA-safe), one micro-batcher per process."""
    processes = processes or settings.worker_processes
    if processes < 1 or (process_index is not None and not 0 <= process_index < processes):
        raise click.UsageError("--processes must be at least 1, and --process-index below it")
    if processes > 1 and process_index is None:
        from shelfsight.worker.processes import supervise  # imports neither torch nor Celery

        return supervise(settings, processes, concurrency, hostname)
    if process_index is not None:
        from shelfsight.worker.processes import per_process_settings

        settings = per_process_settings(settings, process_index, processes)  # its share of the device
    from shelfsight.worker.app import create_worker_app
    from shelfsight.worker.runtime import runtime_of

    quiet = ["--quiet"] if settings.log_format == "json" else []  # no banner: every line is JSON
    app = create_worker_app(settings)
    app.start([
        *quiet, "worker", "--pool", "threads", "--concurrency", str(concurrency or settings.effective_concurrency()),
        # live uploads first, re-extractions when they leave room (the transport's queue_priority)
        "--queues", f"{settings.extract_queue},{settings.backfill_queue}", "--hostname", hostname,
        "--without-mingle", "--without-gossip", "--loglevel", settings.log_level,
    ])
    return 1 if runtime_of(app).startup_failed else 0  # Celery's own exit code does not come back


@click.command("dead-letters")
@click.option("--count", type=int, default=20, show_default=True, help="How many of the newest to show.")
@json_option
@pass_settings
def dead_letters(settings: Settings, count: int, as_json: bool) -> int:
    """Show the newest dead letters from the Redis stream (full records are in S3)."""
    import redis

    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    entries: Any = client.xrevrange(settings.dead_letter_stream, count=count)
    rows = [{"id": entry_id, **fields} for entry_id, fields in entries]
    if as_json:
        echo_json(rows)
        return 0
    for row in rows:
        click.echo(f"{row['id']}  {row.get('error_code', '?'):<22} {row.get('event_id', '?')}  "
                   f"{row.get('message', '')}  ({row.get('record', '')})")
    if not rows:
        click.echo("no dead letters", err=True)
    return 0


