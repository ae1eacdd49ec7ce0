"""The job state machine. Every transition is one conditional UPDATE plus one audit event, in the
caller's transaction, so two workers racing on the same job cannot both move it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import JobNotFoundError, SubmissionInProgressError
from core.job_kinds import LEAF_KINDS
from db import audit
from db.models import TERMINAL_STATES, Job, JobState, utcnow

#: Allowed predecessors of each state. ``running → running`` is a redelivery after a crash;
#: ``running → queued`` is a retry while Triton is unavailable; ``failed → queued`` is an
#: operator's explicit retry.
ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RECEIVED, JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.DONE: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.FAILED: frozenset({JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING}),
    JobState.REJECTED: frozenset({JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING}),
    JobState.NOT_APPLICABLE: frozenset({JobState.QUEUED, JobState.RUNNING}),
}


def transition(
    session: Session,
    job_id: int,
    to: JobState,
    *,
    actor: str,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
) -> bool:
    """Move a job to ``to`` if its current state allows it; audit it. Returns False otherwise."""
    now = utcnow()
    values: dict[str, Any] = {"state": to.value, "updated_at": now}
    if to is JobState.QUEUED:
        values["queued_at"] = now
    elif to is JobState.RUNNING:
        values["started_at"] = now
        values["attempts"] = Job.attempts + 1
    if to in TERMINAL_STATES:
        values["finished_at"] = now
    if error is not None or to in (JobState.DONE, JobState.RUNNING):
        values["error"] = error
    if summary is not None:
        values["summary"] = summary
    allowed = [s.value for s in ALLOWED_FROM[to]]
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Job).where(Job.id == job_id, Job.state.in_(allowed)).values(**values)
    )
    if result.rowcount == 0:
        return False
    audit.append(
        session,
        actor=actor,
        action=f"job.{to.value}",
        subject=f"job:{job_id}",
        details={**({"error": error} if error else {}), **(details or {})},
    )
    return True


def live_job_for_key(session: Session, base_key: str) -> Job | None:
    """The newest job submitted under ``base_key`` (or its ``#retry``/``#force`` variants) that
    did not fail: re-submitting the same file finds it; a failed one may be submitted again."""
    return session.scalars(
        select(Job)
        .where(
            (Job.idempotency_key == base_key) | Job.idempotency_key.like(base_key + "#%"),
            Job.state.not_in([JobState.FAILED.value, JobState.REJECTED.value]),
        )
        .order_by(Job.id.desc())
        .limit(1)
    ).first()


def next_key(session: Session, base_key: str, force: bool) -> str:
    """``base_key`` itself the first time, then a numbered variant (the key column is unique)."""
    taken = session.scalar(
        select(func.count())
        .select_from(Job)
        .where((Job.idempotency_key == base_key) | Job.idempotency_key.like(base_key + "#%"))
    )
    if not taken:
        return base_key
    return f"{base_key}#{'force' if force else 'retry'}{taken}"


def add_submission(session: Session, job: Job, name: str) -> None:
    """Insert a new top-level job; its unique key refuses a concurrent submission of the same
    content, which is reported as such."""
    session.add(job)
    try:
        session.flush()
    except IntegrityError as exc:
        raise SubmissionInProgressError(
            f"{name} is being submitted by another process right now"
        ) from exc


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id}; `medbatch jobs` lists the jobs that exist")
    return job


def child_state_counts(session: Session, parent_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Job.state, func.count()).where(Job.parent_id == parent_id).group_by(Job.state)
    ).all()
    return {state: int(n) for state, n in rows}


def finish_parent_if_complete(session: Session, parent_id: int, *, actor: str) -> bool:
    """Close a parent job once it is fully submitted and every child is terminal.

    Called by the submitter after its last chunk and by each worker after its chunk, each in a
    fresh transaction after committing its own work, so whichever commits last closes the parent.
    """
    parent = session.get(Job, parent_id, with_for_update=True)
    if parent is None or parent.state not in (JobState.QUEUED.value, JobState.RUNNING.value):
        return False
    counts = child_state_counts(session, parent_id)
    open_children = sum(n for s, n in counts.items() if JobState(s) not in TERMINAL_STATES)
    if open_children:
        return False
    failed = counts.get(JobState.FAILED.value, 0)
    summary = {**(parent.summary or {}), "chunk_states": counts}
    if failed:
        first_error = session.scalar(
            select(Job.error)
            .where(Job.parent_id == parent_id, Job.state == JobState.FAILED.value)
            .order_by(Job.id)
            .limit(1)
        )
        return transition(
            session,
            parent_id,
            JobState.FAILED,
            actor=actor,
            error=f"{failed} of {sum(counts.values())} chunks failed; first: {first_error}",
            summary=summary,
        )
    return transition(session, parent_id, JobState.DONE, actor=actor, summary=summary)


def retry_failed(session: Session, job_id: int, *, actor: str) -> list[int]:
    """An operator's retry: re-queue a failed leaf job (a chunk, a study, a send), or a
    screening job's failed chunks.

    Their delivery count starts again (the audit event keeps the old one), and a failed parent
    re-opens so it closes again when its chunks do. Returns the chunk ids to publish.
    """
    job = get_job(session, job_id)
    if job.kind in LEAF_KINDS:
        candidates = [(job.id, job.attempts)] if job.state == JobState.FAILED.value else []
    else:
        candidates = [
            (int(i), int(a))
            for i, a in session.execute(
                select(Job.id, Job.attempts).where(
                    Job.parent_id == job.id, Job.state == JobState.FAILED.value
                )
            )
        ]
    requeued = []
    for chunk_id, attempts in candidates:
        if transition(
            session,
            chunk_id,
            JobState.QUEUED,
            actor=actor,
            details={"by": "retry", "previous_attempts": attempts},
        ):
            session.execute(update(Job).where(Job.id == chunk_id).values(attempts=0))
            requeued.append(chunk_id)
    parent_id = job.parent_id if job.kind in LEAF_KINDS else job.id
    if requeued and parent_id is not None:  # a failed parent re-opens (refused otherwise)
        transition(session, parent_id, JobState.QUEUED, actor=actor, details={"by": "retry"})
    return requeued
