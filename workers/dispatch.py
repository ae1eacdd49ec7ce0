"""Publishing job ids to their queue. Only ids travel: the database holds the work."""

from __future__ import annotations

from db.models import JobKind
from workers.celery_app import (
    TASK_EHR_INGEST,
    TASK_EHR_SCORE,
    TASK_SCORE_CHUNK,
    TASK_SCORE_STUDY,
    TASK_SEND_RESULT,
    app,
)

TASK_FOR_KIND: dict[str, str] = {
    JobKind.CHEM_CHUNK.value: TASK_SCORE_CHUNK,
    JobKind.DICOM_STUDY.value: TASK_SCORE_STUDY,
    JobKind.DICOM_SEND.value: TASK_SEND_RESULT,
    JobKind.EHR_INGEST.value: TASK_EHR_INGEST,
    JobKind.EHR_BATCH.value: TASK_EHR_SCORE,
}


def publish(job_id: int, kind: str) -> None:
    """Send one job to its queue; raises kombu/redis errors if the broker cannot take it."""
    app.send_task(
        TASK_FOR_KIND[kind],
        args=[job_id],
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0},
    )
