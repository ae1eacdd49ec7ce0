"""Jobs as people and programs see them: lists, one job with its children, progress, waiting,
and the operator's retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select

from core.errors import MedbatchError
from core.job_kinds import job_kind
from core.settings import Settings
from db import audit
from db import jobs as db_jobs
from db.models import TERMINAL_STATES, Job, JobState
from db.session import read_scope, session_scope

__all__ = [
    "JobInfo",
    "JobState",
    "Progress",
    "job_progress",
    "list_jobs",
    "progress_of",
    "retry_job",
]


#: Seconds between polls of a job's progress: the command returns at most this long after the
#: job ends; one query each (:func:`job_progress`), so ten a second at most.
POLL_S = 0.1


@dataclass(frozen=True)
class JobInfo:
    id: int
    kind: str
    label: str
    parent_id: int | None
    source: str
    state: str
    item_count: int
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    summary: dict[str, Any] = field(default_factory=dict)
    children: dict[str, int] = field(default_factory=dict)  # state → count

    @property
    def terminal(self) -> bool:
        return JobState(self.state).terminal

    @classmethod
    def of(cls, job: Job, children: dict[str, int] | None = None) -> JobInfo:
        return cls(
            id=int(job.id),
            kind=job.kind,
            label=job_kind(job.kind).label,
            parent_id=job.parent_id,
            source=job.source,
            state=job.state,
            item_count=job.item_count,
            attempts=job.attempts,
            error=job.error,
            created_at=job.created_at,
            updated_at=job.updated_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            summary=dict(job.summary or {}),
            children=dict(children or {}),
        )


@dataclass(frozen=True)
class Progress:
    """How far a job is: its state and its children's (chunks, batches) finished/total."""

    job_id: int
    state: str
    children_total: int
    children_finished: int

    @property
    def terminal(self) -> bool:
        return JobState(self.state).terminal


def list_jobs(
    settings: Settings,
    *,
    actor: str,
    kind: str | None = None,
    state: str | None = None,
    limit: int = 20,
    before_id: int | None = None,
    top_level: bool = True,
) -> list[JobInfo]:
    """The newest jobs (top-level ones: what was submitted), optionally of one kind or state,
    ``limit`` of them with ids below ``before_id`` (the next page)."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if top_level:
        query = query.where(Job.parent_id.is_(None))
    if kind is not None:
        query = query.where(Job.kind == kind)
    if state is not None:
        query = query.where(Job.state == state)
    if before_id is not None:
        query = query.where(Job.id < before_id)
    with session_scope(settings.database_url) as session:
        audit.append(session, actor=actor, action="jobs.read", subject="job:*")
        return [JobInfo.of(job) for job in session.scalars(query)]


def show_job(settings: Settings, job_id: int, *, actor: str) -> JobInfo:
    """One job with the states of its children; :class:`JobNotFoundError` if there is none."""
    with session_scope(settings.database_url) as session:
        audit.append(session, actor=actor, action="jobs.read", subject=f"job:{job_id}")
        job = db_jobs.get_job(session, job_id)
        return JobInfo.of(job, db_jobs.child_state_counts(session, job_id))


def job_progress(settings: Settings, job_id: int) -> Progress:
    """State and children finished/total (polled by progress bars; not an access to results):
    one statement on a read-only transaction, so polling it ten times a second stays cheap and
    on SQLite takes no write lock from the workers."""
    query = (
        select(Job.parent_id, Job.state, func.count())
        .where(or_(Job.id == job_id, Job.parent_id == job_id))
        .group_by(Job.parent_id, Job.state)
    )
    with read_scope(settings.database_url) as session:
        rows = session.execute(query).all()
        children = [(s, int(n)) for parent, s, n in rows if parent == job_id]
        own = [s for parent, s, _ in rows if parent != job_id]  # the job itself
        state = own[0] if own else db_jobs.get_job(session, job_id).state  # raises: no such job
    total = sum(n for _, n in children)
    finished = sum(n for s, n in children if JobState(s) in TERMINAL_STATES)
    return Progress(job_id, state, total, finished)


def progress_of(settings: Settings, job_ids: list[int]) -> dict[int, Progress]:
    """The progress of several jobs in two queries (a page of jobs, polled by the console);
    ids that name no job are left out. Not an access to results, so not audited."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    with session_scope(settings.database_url) as session:
        states = dict(session.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())
        rows = session.execute(
            select(Job.parent_id, Job.state, func.count())
            .where(Job.parent_id.in_(ids))
            .group_by(Job.parent_id, Job.state)
        ).all()
    total: dict[int, int] = {}
    finished: dict[int, int] = {}
    for parent_id, state, n in rows:
        parent = int(parent_id or 0)  # never None: the query asks for children
        total[parent] = total.get(parent, 0) + int(n)
        if JobState(state) in TERMINAL_STATES:
            finished[parent] = finished.get(parent, 0) + int(n)
    return {
        int(i): Progress(int(i), state, total.get(i, 0), finished.get(i, 0))
        for i, state in states.items()
    }


def wait_for_job(
    settings: Settings,
    job_id: int,
    timeout: float,
    on_progress: Callable[[Progress], None] | None = None,
    poll_s: float = POLL_S,
) -> Progress:
    """Poll until the job ends; :class:`MedbatchError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        progress = job_progress(settings, job_id)
        if on_progress is not None:
            on_progress(progress)
        if progress.terminal:
            return progress
        if time.monotonic() > deadline:
            raise MedbatchError(
                f"job {job_id} not finished after {timeout:.0f} s; "
                f"`medbatch jobs {job_id}` shows it"
            )
        time.sleep(poll_s)


def retry_job(settings: Settings, job_id: int, *, actor: str) -> list[int]:
    """Re-queue a failed job (a chunk, a study, a send) or a parent's failed children, after
    the operator fixed the cause; returns the jobs published again."""
    with session_scope(settings.database_url) as session:
        requeued = db_jobs.retry_failed(session, job_id, actor=actor)
        kinds = {i: session.get_one(Job, i).kind for i in requeued}
    from workers.dispatch import publish  # the Celery app: only when something is published

    for i, kind in kinds.items():
        publish(i, kind)
    return requeued
