"""The job API: a REST service to submit, watch and cancel GRPO training jobs on Ray.

- ``settings`` — ``ApiSettings`` (environment, prefix ``GRPO_API_``);
- ``states`` — the job state machine (one transition table);
- ``store`` — the durable store (SQLAlchemy: SQLite by default, Postgres by URL);
- ``specs`` — path confinement and redaction of submitted specs;
- ``launcher`` — Ray's job submission API (constant entrypoint, spec as a file);
- ``reconciler`` — the background loop: FIFO scheduling, reconciling with Ray, grace;
- ``jobs`` — ``JobService``, the operations behind the routes;
- ``routes`` — one router per resource; ``app`` — ``create_app``; ``server`` — uvicorn.

Import ``create_app`` from ``services.api.app`` (this package imports nothing heavy, so
that ``services.client`` can use its models alone).
"""
