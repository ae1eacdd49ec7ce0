"""Publishing job ids to their queue. Only ids travel: the database holds the work."""

from __future__ import annotations

from core.job_kinds import job_kind
from workers.celery_app import app


def publish(job_id: int, kind: str) -> None:
    """Send one job to its kind's task; raises kombu/redis errors if the broker cannot take it."""
    task = job_kind(kind).task
    if task is None:
        raise ValueError(f"a {kind} job is not run by a task; publish its children")
    app.send_task(
        task,
        args=[job_id],
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0},
    )
