"""What every task does around its own work: claim the job, give up on poison messages, wait
out an unavailable dependency with back-off, and always leave the job in a state that says what
happened. The chem, DICOM and send tasks share it so they behave the same under faults.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import Task
from celery.exceptions import Retry
from sqlalchemy.exc import DBAPIError, OperationalError

from core.errors import InferenceError, InferenceUnavailableError, StorageUnavailableError
from core.job_kinds import JOB_KINDS, JobKind
from core.settings import Settings, get_settings
from db import audit
from db.jobs import finish_parent_if_complete, transition
from db.models import TERMINAL_STATES, Job, JobState
from db.session import session_scope
from workers import triton_client
from workers.celery_app import app
from workers.metrics import CHUNKS, TRITON_SECONDS, TRITON_UNAVAILABLE

log = logging.getLogger(__name__)


def backoff_s(settings: Settings, retries: int) -> float:
    """Exponential back-off with ±20 % jitter, capped: retries spread out during an outage."""
    delay = min(settings.triton_retry_base_s * (2**retries), settings.triton_retry_max_s)
    return delay * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Claim:
    """A job this delivery now runs (state ``running``)."""

    job_id: int
    kind: str
    parent_id: int | None
    params: dict[str, Any]


def claim(task: Task, job_id: int, settings: Settings) -> Claim | str:
    """Move the job to ``running``, or return the outcome word when this delivery must not run.

    Duplicate deliveries of a finished job are ignored; a job whose deliveries keep ending
    without a result (worker killed, time limit) is failed after ``max_deliveries``.
    """
    actor = audit.current_actor("worker")
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.error("job %s does not exist; message dropped", job_id)
            return "missing"
        if JobState(job.state) in TERMINAL_STATES:
            log.info("job %s already %s; duplicate delivery ignored", job_id, job.state)
            return f"already-{job.state}"
        found = Claim(job_id, job.kind, job.parent_id, dict(job.params or {}))
        # Runs that ended without a result, not counting retries we scheduled ourselves.
        deliveries = job.attempts - int(task.request.retries or 0)
        if deliveries < settings.max_deliveries and not transition(
            session, job_id, JobState.RUNNING, actor=actor
        ):
            return "not-runnable"
    if deliveries >= settings.max_deliveries:
        error = (
            f"gave up after {deliveries} deliveries that ended without a result "
            "(worker killed or timed out each time); see the worker logs, then `medbatch retry`"
        )
        close(found, JobState.FAILED, settings, error=error)
        return "failed"
    return found


def close(job: Claim, state: JobState, settings: Settings, **kw: Any) -> None:
    """Finish a job (and its parent, if this was the parent's last open child)."""
    CHUNKS.labels(job.kind, state.value).inc()
    actor = audit.current_actor("worker")
    with session_scope(settings.database_url) as session:
        transition(session, job.job_id, state, actor=actor, **kw)
    if job.parent_id is not None:
        with session_scope(settings.database_url) as session:
            finish_parent_if_complete(session, job.parent_id, actor=actor)


def wait_or_fail(
    task: Task, job: Claim, settings: Settings, exc: Exception, *, what: str, remedy: str
) -> str:
    """A dependency (Triton, a destination AE) is unavailable: re-queue with back-off, or fail
    the job once the retries are spent. Raises Celery's Retry in the first case."""
    retries = int(task.request.retries or 0)
    if retries >= settings.triton_max_retries:
        close(
            job,
            JobState.FAILED,
            settings,
            error=(
                f"{what} was unavailable through {retries} retries "
                f"(about {settings.longest_backoff_total_s:.0f} s): {exc}. {remedy}"
            ),
        )
        return "failed"
    countdown = backoff_s(settings, retries)
    with session_scope(settings.database_url) as session:
        transition(
            session,
            job.job_id,
            JobState.QUEUED,
            actor=audit.current_actor("worker"),
            error=f"waiting for {what} (retry {retries + 1} of {settings.triton_max_retries} "
            f"in {countdown:.0f} s): {exc}",
        )
    raise task.retry(countdown=countdown, exc=exc) from exc


def infer_or_wait(
    task: Task,
    job: Claim,
    settings: Settings,
    model: str,
    version: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    *,
    fail_on_refusal: bool = True,
) -> dict[str, np.ndarray] | str:
    """One Triton request for ``job``: its outputs, or the outcome word once the job is closed
    (Triton refused the request) — or Celery's Retry while Triton is unavailable. With
    ``fail_on_refusal=False`` a refusal is raised (:class:`InferenceError`) for the caller to
    isolate the offending items instead of failing the job."""
    try:
        return triton_infer(settings, job.job_id, model, version, inputs, outputs)
    except InferenceUnavailableError as exc:
        return wait_for_triton(task, job, settings, exc, model)
    except InferenceError as exc:
        if not fail_on_refusal:
            raise
        close(job, JobState.FAILED, settings, error=str(exc))
        return "failed"


def triton_infer(
    settings: Settings,
    job_id: int,
    model: str,
    version: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
) -> dict[str, np.ndarray]:
    """One timed Triton request; touches no job state, so it may run on any thread. Raises
    :class:`InferenceUnavailableError` or :class:`InferenceError`."""
    started = time.perf_counter()
    out = triton_client.infer(
        settings.triton_grpc_url,
        model,
        version,
        inputs,
        outputs,
        timeout_s=settings.triton_timeout_s,
        request_id=f"job-{job_id}",
    )
    TRITON_SECONDS.labels(model).observe(time.perf_counter() - started)
    return out


def wait_for_triton(
    task: Task, job: Claim, settings: Settings, exc: InferenceUnavailableError, model: str
) -> str:
    """Triton could not serve ``job``: count it, then re-queue with back-off or fail (see
    :func:`wait_or_fail`; raises Celery's Retry in the first case)."""
    TRITON_UNAVAILABLE.labels(model).inc()
    return wait_or_fail(
        task,
        job,
        settings,
        exc,
        what="Triton",
        remedy="Check `medbatch triton` / the triton service, then `medbatch retry`.",
    )


#: A task's own work: (the Celery task, the job id, the settings) → a short outcome word.
Body = Callable[[Task, int, Settings], str]


def job_task(kind: JobKind) -> Callable[[Body], Body]:
    """Register ``body`` as the Celery task that runs jobs of ``kind`` (its name and queue come
    from the job-kind table), run under :func:`run_guarded` with the process's settings."""
    name = JOB_KINDS[kind].task
    if name is None:
        raise ValueError(f"{kind} jobs are parents; no task runs them")

    def register(body: Body) -> Body:
        @app.task(name=name, bind=True, max_retries=None)
        def run(self: Task, job_id: int) -> str:
            return run_guarded(self, job_id, get_settings(), body)

        run.__doc__ = body.__doc__
        return body

    return register


def run_guarded(task: Task, job_id: int, settings: Settings, body: Body) -> str:
    """Run a task body so that the job always ends in a state that says what happened.

    A database outage is retried like a Triton outage, and so is an object store outage (the
    job waits with back-off, then fails saying so; `medbatch retry` resumes it); any other
    unexpected error fails the job with its message instead of leaving it ``running`` behind an
    acknowledged message.
    """
    try:
        return body(task, job_id, settings)
    except Retry:
        raise
    except StorageUnavailableError as exc:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            found = Claim(job_id, job.kind, job.parent_id, {}) if job else None
        if found is None:
            raise
        log.warning("job %s: object storage unavailable: %s", job_id, exc)
        return wait_or_fail(
            task,
            found,
            settings,
            exc,
            what="object storage",
            remedy="Check the S3 service (MEDBATCH_STORAGE_URL, MEDBATCH_S3_ENDPOINT_URL), "
            "then `medbatch retry`.",
        )
    except DBAPIError as exc:
        if not exc.connection_invalidated and not isinstance(exc, OperationalError):
            raise
        retries = int(task.request.retries or 0)
        raise task.retry(countdown=backoff_s(settings, retries), exc=exc) from exc
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        with contextlib.suppress(Exception):
            with session_scope(settings.database_url) as session:
                job = session.get(Job, job_id)
                found = Claim(job_id, job.kind, job.parent_id, {}) if job else None
            if found is not None:
                close(found, JobState.FAILED, settings, error=f"internal error: {exc!r}")
        raise
