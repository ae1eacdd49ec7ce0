"""Study completion: a study is complete once no instance has arrived for the quiet period.

Closing a study bumps its version and creates one scoring job for that version, in one
transaction under the study's row lock, so the listener's watcher and the sweeper (its
backstop when no listener runs) can both call this without ever creating two jobs.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from core.job_kinds import JobKind
from core.settings import Settings
from db import audit
from db.jobs import transition
from db.models import DicomInstance, DicomStudy, Job, JobState, utcnow
from db.session import session_scope

log = logging.getLogger(__name__)


def close_quiet_studies(
    settings: Settings, *, actor: str, now: datetime | None = None
) -> list[int]:
    """Close every open study quiet for ``dicom_quiet_period_s``; returns the new job ids.

    The jobs are committed in state ``queued``; the caller publishes them (a publish that fails
    is recovered by the sweeper, which re-sends open jobs absent from the broker).
    """
    cutoff = (now or utcnow()) - timedelta(seconds=settings.dicom_quiet_period_s)
    with session_scope(settings.database_url) as session:
        candidates = session.scalars(
            select(DicomStudy.id).where(
                DicomStudy.open.is_(True), DicomStudy.last_instance_at < cutoff
            )
        ).all()
    jobs: list[int] = []
    for study_id in candidates:
        with session_scope(settings.database_url) as session:
            study = session.get(DicomStudy, study_id, with_for_update=True)
            if study is None or not study.open:
                continue
            last = study.last_instance_at
            if last.tzinfo is None:  # SQLite returns naive UTC
                last = last.replace(tzinfo=cutoff.tzinfo)
            if last >= cutoff:
                continue
            version = study.version + 1
            n_instances = session.scalar(
                select(func.count())
                .select_from(DicomInstance)
                .where(DicomInstance.study_id == study_id, DicomInstance.batch <= version)
            )
            session.execute(
                update(DicomStudy)
                .where(DicomStudy.id == study_id)
                .values(open=False, version=version)
            )
            job = Job(
                kind=JobKind.DICOM_STUDY.value,
                source=f"dicom-study:{study_id}",
                idempotency_key=f"dicom-study:{study_id}:v{version}",
                params={
                    "study_id": study_id,
                    "version": version,
                    "model_name": settings.dicom_model_name,
                    "model_version": settings.dicom_model_version,
                },
                item_count=int(n_instances or 0),
            )
            session.add(job)
            session.flush()
            audit.append(
                session,
                actor=actor,
                action="dicom.study_complete",
                subject=f"dicom-study:{study_id}",
                details={
                    "version": version,
                    "instances": int(n_instances or 0),
                    "job": job.id,
                    "quiet_period_s": settings.dicom_quiet_period_s,
                },
            )
            transition(session, job.id, JobState.QUEUED, actor=actor)
            jobs.append(job.id)
        log.info("study %s complete (version %s): job %s", study_id, version, job.id)
    return jobs
