"""EHR extracts: register one for scoring, follow its ingest and scoring, and what came of it."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import aliased

from core.job_kinds import JobKind
from core.model_registry import served_model
from db import audit
from db.jobs import get_job
from db.models import TERMINAL_STATES, EhrScore, Job, JobState
from db.session import read_scope, session_scope
from medbatch.services.stack import prepare_submission

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, ScalarSelect
    from sqlalchemy.orm import Session

    from core.settings import Settings
    from ingest.ehr.submit import ExtractSubmission


@dataclass(frozen=True)
class ExtractProgress:
    """An extract's ingest (bytes read of the stored file, rows) and scoring (batches)."""

    job_id: int
    state: str
    size_bytes: int
    bytes_read: int
    accepted_rows: int
    rejected_rows: int
    ingest_done: bool
    batches_total: int = 0
    batches_finished: int = 0  # done, failed, …: no longer running

    @property
    def terminal(self) -> bool:
        return JobState(self.state).terminal


@dataclass(frozen=True)
class ExtractSummary:
    job_id: int
    source: str
    state: str
    error: str | None
    accepted_rows: int
    rejected_rows: int
    rejected_by_kind: dict[str, int]
    patients_scored: int
    out_of_distribution: int
    batches: int
    skipped: dict[str, int] = field(default_factory=dict)  # FHIR: entered-in-error, …
    unknown_codes: dict[str, int] = field(default_factory=dict)  # FHIR: codes no model uses
    created_at: datetime | None = None
    finished_at: datetime | None = None


def submit_extract(
    settings: Settings, path: Path, *, actor: str, force: bool = False
) -> ExtractSubmission:
    """Register an extract, once per content: its ingest is queued, or the job that already
    holds this content is returned. A file that is not an extract is a rejected job."""
    from ingest.ehr.submit import submit_extract as submit
    from workers.dispatch import publish

    prepare_submission(settings)
    return submit(path, settings, publish, force=force, actor=actor)


def extract_progress(settings: Settings, extract_id: int) -> ExtractProgress:
    """The extract's state, its ingest's bytes and rows, and its batches total and finished, in
    one statement on a read-only transaction: ``medbatch ehr`` polls it ten times a second
    while workers write (on SQLite a read transaction takes no write lock)."""
    batch = aliased(Job)

    def batches(*where: ColumnElement[bool]) -> ScalarSelect[int]:
        return (
            select(func.count())
            .select_from(batch)
            .where(batch.parent_id == extract_id, batch.kind == JobKind.EHR_BATCH.value, *where)
            .scalar_subquery()
        )

    terminal = [s.value for s in TERMINAL_STATES]
    query = select(Job, batches(), batches(batch.state.in_(terminal))).where(
        or_(
            Job.id == extract_id,
            and_(Job.parent_id == extract_id, Job.kind == JobKind.EHR_INGEST.value),
        )
    )
    with read_scope(settings.database_url) as session:
        rows = session.execute(query).all()
        extract = next((j for j, _, _ in rows if j.id == extract_id), None)
        if extract is None:
            extract = get_job(session, extract_id)  # raises JobNotFoundError
        ingest = next((j for j, _, _ in rows if j.id != extract_id), None)
    total, finished = (int(rows[0][1]), int(rows[0][2])) if rows else (0, 0)
    summary = dict(ingest.summary or {}) if ingest is not None else {}
    size = int((ingest.params if ingest is not None else extract.params).get("size_bytes", 0))
    return ExtractProgress(
        job_id=extract_id,
        state=extract.state,
        size_bytes=size,
        bytes_read=int(summary.get("bytes_read", 0)),
        accepted_rows=int(summary.get("accepted_rows", 0)),
        rejected_rows=int(summary.get("rejected_rows", 0)),
        ingest_done=ingest is not None and ingest.state == JobState.DONE.value,
        batches_total=total,
        batches_finished=finished,
    )


def _summary(job: Job, patients: int, ood: int) -> ExtractSummary:
    c = dict(job.summary or {})

    def counts(key: str) -> dict[str, int]:
        return {str(k): int(v) for k, v in c.get(key, {}).items()}

    return ExtractSummary(
        job_id=int(job.id),
        source=job.source,
        state=job.state,
        error=job.error,
        accepted_rows=int(c.get("accepted_rows", 0)),
        rejected_rows=int(c.get("rejected_rows", 0)),
        rejected_by_kind=counts("rejected_by_kind"),
        patients_scored=patients,
        out_of_distribution=ood,
        batches=int(c.get("buckets", 0)),
        skipped=counts("skipped"),
        unknown_codes=counts("unknown_codes"),
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def _scored(session: Session, extract_ids: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Patients scored and profiles out of distribution, per extract."""
    patients = session.execute(
        select(EhrScore.extract_id, func.count(func.distinct(EhrScore.patient_id)))
        .where(EhrScore.extract_id.in_(extract_ids))
        .group_by(EhrScore.extract_id)
    ).all()
    ood = session.execute(
        select(EhrScore.extract_id, func.count())
        .where(EhrScore.extract_id.in_(extract_ids), EhrScore.out_of_distribution.is_(True))
        .group_by(EhrScore.extract_id)
    ).all()
    return {int(i): int(n) for i, n in patients}, {int(i): int(n) for i, n in ood}


def extract_summary(settings: Settings, extract_id: int) -> ExtractSummary:
    """Rows accepted and rejected (by reason), patients scored, profiles out of distribution."""
    with session_scope(settings.database_url) as session:
        job = get_job(session, extract_id)
        patients, ood = _scored(session, [extract_id])
        return _summary(job, patients.get(extract_id, 0), ood.get(extract_id, 0))


def list_extracts(
    settings: Settings, *, actor: str, limit: int = 50, before_id: int | None = None
) -> list[ExtractSummary]:
    """The newest extracts with their counts (rows accepted and rejected, patients scored,
    profiles out of distribution): three queries for the whole page (the console's list)."""
    query = (
        select(Job)
        .where(Job.kind == JobKind.EHR_EXTRACT.value)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if before_id is not None:
        query = query.where(Job.id < before_id)
    with session_scope(settings.database_url) as session:
        audit.append(session, actor=actor, action="jobs.read", subject="ehr-extract:*")
        jobs = list(session.scalars(query))
        patients, ood = _scored(session, [int(j.id) for j in jobs])
        return [_summary(j, patients.get(int(j.id), 0), ood.get(int(j.id), 0)) for j in jobs]


def truth_auroc(settings: Settings, extract_id: int, truth_csv: Path) -> dict[str, float | None]:
    """AUROC of each model's stored risks against the synthetic generator's ground truth (the
    demo's check: a real extract has no truth file); models without a truth column are left
    out."""
    from medbatch.training.metrics import auroc  # numpy: the demo's check only

    with truth_csv.open() as fh:
        truth = {r["patient_id"]: r for r in csv.DictReader(fh)}
    found: dict[str, tuple[list[float], list[int]]] = {}
    with session_scope(settings.database_url) as session:
        models = dict(get_job(session, extract_id).params.get("models", {}))
        labels = {m: served_model(m, settings).truth_label for m in models}
        for m, label in labels.items():
            if label is not None:
                found[m] = ([], [])
        for model, patient_id, risk in session.execute(
            select(EhrScore.model_name, EhrScore.patient_id, EhrScore.risk).where(
                EhrScore.extract_id == extract_id
            )
        ):
            label = labels.get(model)
            if label is not None and patient_id in truth and risk is not None:
                found[model][0].append(float(risk))
                found[model][1].append(int(truth[patient_id][label]))
    return {m: auroc(*found[m]) for m in found}
