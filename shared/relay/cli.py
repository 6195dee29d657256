"""`shelfsight relay`: storage notifications in, upload events out (a long-running producer)."""

from __future__ import annotations

import click

from shelfsight.shared.cli import EXIT_OK, EXIT_USAGE, pass_settings
from shelfsight.shared.settings import Settings


@click.command(epilog="Exit codes: 0 stopped by SIGTERM/SIGINT after finishing its batch; 2 bad "
               "options (exactly one of --sqs, --redis-list, --webhook; the webhook needs "
               "SHELFSIGHT_RELAY_WEBHOOK_TOKEN).")
@click.option("--sqs", "sqs_url", metavar="QUEUE_URL",
              help="Relay from an SQS queue fed by S3 (directly, through SNS or EventBridge). "
                   "Endpoint: SHELFSIGHT_SQS_ENDPOINT_URL (empty: AWS).")
@click.option("--redis-list", metavar="KEY",
              help="Relay from a Redis list, e.g. MinIO's Redis target (format access). Redis: "
                   "SHELFSIGHT_RELAY_REDIS_URL (empty: the broker).")
@click.option("--processing-list", metavar="KEY",
              help="With --redis-list: where items wait while relayed, recovered on restart. "
                   "Default KEY:processing; give each relay process its own.")
@click.option("--webhook", metavar="HOST:PORT",
              help="Serve an HTTP endpoint (MinIO's webhook target) behind the bearer token "
                   "SHELFSIGHT_RELAY_WEBHOOK_TOKEN.")
@pass_settings
def relay(settings: Settings, sqs_url: str | None, redis_list: str | None,
          processing_list: str | None, webhook: str | None) -> int:
    """Turn storage notifications into upload events, until SIGTERM/SIGINT.

    A notification leaves its source only after its events are enqueued (SQS: deleted after
    enqueue; Redis list: BLMOVE to a processing list, LREM after enqueue, the processing list
    recovered on restart; webhook: 200 only after enqueue). A redelivered notification enqueues
    the same event ids. A record that cannot become an event is dead-lettered; the records
    beside it are still enqueued. Metrics: SHELFSIGHT_METRICS_PORT.
    """
    from shelfsight.shared.relay import runner

    chosen = [name for name, value in (("--sqs", sqs_url), ("--redis-list", redis_list),
                                       ("--webhook", webhook)) if value]
    if len(chosen) != 1:
        click.echo("relay needs exactly one of --sqs QUEUE_URL, --redis-list KEY, --webhook HOST:PORT"
                   + (f" (got {', '.join(chosen)})" if chosen else ""), err=True)
        return EXIT_USAGE
    if processing_list and not redis_list:
        click.echo("--processing-list goes with --redis-list", err=True)
        return EXIT_USAGE
    try:
        if sqs_url:
            source: runner.Source = runner.sqs_source(settings, sqs_url)
        elif redis_list:
            source = runner.redis_list_source(settings, redis_list, processing_list)
        else:
            source = runner.webhook_source(settings, webhook or "")
    except ValueError as exc:
        click.echo(f"relay: {exc}", err=True)
        return EXIT_USAGE
    runner.run_relay(settings, source)
    return EXIT_OK
