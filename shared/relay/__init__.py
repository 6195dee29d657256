"""`shelfsight relay`: storage notifications (SQS, a Redis list, a webhook) to upload events.

A producer: it imports only shelfsight.shared, never the worker or the trainer.

- `envelopes`: S3 / SNS / EventBridge / MinIO envelopes unwrapped into S3 records;
- `core`: `Relay.handle`, per-record validation, enqueue, dead letters;
- `sources`: SQS, Redis list (BLMOVE + processing list), webhook;
- `runner`: wiring from Settings; `cli`: the command.
"""
