"""Compound libraries: submit one for screening, and what became of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.model_registry import served_model
from core.served_models import IN_DOMAIN
from core.settings import Settings
from db.jobs import get_job
from db.models import Job, LibraryEntry, Prediction
from db.session import session_scope
from ingest.chem.submit import ProgressFn, ScreenOptions, SubmitResult
from medbatch.services.stack import prepare_submission

__all__ = ["ScreenOptions", "ScreeningSummary", "screening_summary", "submit_library"]


@dataclass(frozen=True)
class ScreeningSummary:
    job_id: int
    source: str
    state: str
    error: str | None
    rows: int
    valid: int
    rejected: int
    duplicates: int
    already_scored: int
    scored_now: int
    chunks: int
    #: Molecules of the library outside the model's applicability domain (scored, and flagged);
    #: ``None`` for a model without one.
    out_of_domain: int | None = None


def _out_of_domain(session: Session, job: Job) -> int | None:
    """Distinct molecules of the library whose stored prediction is flagged out of domain."""
    params = dict(job.params or {})
    if "model_name" not in params:
        return None
    model = served_model(str(params["model_name"]))
    if not model.has_domain():
        return None
    count = session.scalar(
        select(func.count(func.distinct(LibraryEntry.compound_id)))
        .join(
            Prediction,
            (Prediction.compound_id == LibraryEntry.compound_id)
            & (Prediction.model_name == model.name)
            & (Prediction.model_version == str(params.get("model_version", ""))),
        )
        .where(
            LibraryEntry.job_id == job.id,
            Prediction.outputs[IN_DOMAIN].as_boolean().is_(False),
        )
    )
    return int(count or 0)


def submit_library(
    settings: Settings,
    path: Path,
    options: ScreenOptions,
    *,
    actor: str,
    progress: ProgressFn | None = None,
    on_registered: Callable[[int], None] | None = None,
) -> SubmitResult:
    """Validate, deduplicate and chunk a library file; each chunk is published as soon as it is
    stored. The same file with the same options returns the job that already holds it."""
    from ingest.chem.submit import submit_library as submit
    from workers.dispatch import publish

    prepare_submission(settings)
    return submit(
        path,
        settings,
        publish,
        options,
        progress=progress,
        actor=actor,
        on_registered=on_registered,
    )


def screening_summary(settings: Settings, job_id: int) -> ScreeningSummary:
    """The counts of a screening job: rows read, valid, rejected, duplicates, scored."""
    with session_scope(settings.database_url) as session:
        job = get_job(session, job_id)
        scored_now = session.scalar(
            select(func.count())
            .select_from(Prediction)
            .join(Job, Job.id == Prediction.job_id)
            .where(Job.parent_id == job_id)
        )
        c = dict(job.summary or {})
        return ScreeningSummary(
            job_id=job_id,
            source=job.source,
            state=job.state,
            error=job.error,
            rows=int(c.get("rows", 0)),
            valid=int(c.get("valid", 0)),
            rejected=int(c.get("rejected", 0)),
            duplicates=int(c.get("duplicates", 0)),
            already_scored=int(c.get("already_scored", 0)),
            scored_now=int(scored_now or 0),
            chunks=int(c.get("chunks", 0)),
            out_of_domain=_out_of_domain(session, job),
        )
