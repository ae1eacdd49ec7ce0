"""Score one chunk of molecules: load from the database, featurise, one Triton call, one commit.

Idempotent by construction: a chunk already ``done`` is skipped, and predictions are inserted
with ON CONFLICT DO NOTHING on (job, compound, model), so a redelivered or duplicated message
stores every result exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from typing import Any

from celery import Task
from celery.exceptions import Retry
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from db import audit
from db.jobs import finish_parent_if_complete, transition
from db.models import (
    TERMINAL_STATES,
    ChunkItem,
    Compound,
    Job,
    JobKind,
    JobState,
    Prediction,
    utcnow,
)
from db.session import session_scope
from db.upsert import insert_ignore
from medbatch.errors import InferenceError, InferenceUnavailableError
from medbatch.settings import Settings, get_settings
from workers import triton_client
from workers.celery_app import TASK_SCORE_CHUNK, app
from workers.chem.featurize import featurize_smiles
from workers.metrics import CHUNKS, ITEMS, TRITON_SECONDS, TRITON_UNAVAILABLE

log = logging.getLogger(__name__)

OUTPUTS = ["LOGS"]


def backoff_s(settings: Settings, retries: int) -> float:
    """Exponential back-off with ±20 % jitter, capped: retries spread out while Triton is down."""
    delay = min(settings.triton_retry_base_s * (2**retries), settings.triton_retry_max_s)
    return delay * random.uniform(0.8, 1.2)


def _load_chunk(job_id: int, settings: Settings) -> list[tuple[int, str]]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Compound.id, Compound.canonical_smiles)
            .join(ChunkItem, ChunkItem.compound_id == Compound.id)
            .where(ChunkItem.job_id == job_id)
            .order_by(ChunkItem.position)
        ).all()
    return [(int(cid), str(smi)) for cid, smi in rows]


def _close(
    job_id: int, parent_id: int | None, state: JobState, settings: Settings, **kw: Any
) -> None:
    CHUNKS.labels(JobKind.CHEM_CHUNK.value, state.value).inc()
    actor = audit.current_actor("worker")
    with session_scope(settings.database_url) as session:
        transition(session, job_id, state, actor=actor, **kw)
    if parent_id is not None:
        with session_scope(settings.database_url) as session:
            finish_parent_if_complete(session, parent_id, actor=actor)


@app.task(name=TASK_SCORE_CHUNK, bind=True, max_retries=None)
def score_chunk(self: Task, job_id: int) -> str:
    """Celery entry point; returns a short outcome word (kept in the worker log only).

    Whatever happens, the job ends in a state that says so: a database outage is retried like a
    Triton outage, and any other error fails the chunk with its message instead of leaving it
    ``running`` behind an acknowledged message.
    """
    settings = get_settings()
    try:
        return _score_chunk(self, job_id, settings)
    except Retry:
        raise
    except DBAPIError as exc:
        if not exc.connection_invalidated and not isinstance(exc, OperationalError):
            raise
        retries = int(self.request.retries or 0)
        raise self.retry(countdown=backoff_s(settings, retries), exc=exc) from exc
    except Exception as exc:
        log.exception("chunk job %s failed unexpectedly", job_id)
        with contextlib.suppress(Exception):
            parent = _parent_of(job_id, settings)
            _close(job_id, parent, JobState.FAILED, settings, error=f"internal error: {exc!r}")
        raise


def _parent_of(job_id: int, settings: Settings) -> int | None:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        return job.parent_id if job is not None else None


def _score_chunk(self: Task, job_id: int, settings: Settings) -> str:
    actor = audit.current_actor("worker")
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.error("chunk job %s does not exist; message dropped", job_id)
            return "missing"
        if JobState(job.state) in TERMINAL_STATES:
            log.info("chunk job %s already %s; duplicate delivery ignored", job_id, job.state)
            return f"already-{job.state}"
        parent_id = job.parent_id
        # Runs that ended without a result, not counting retries we scheduled ourselves.
        deliveries = job.attempts - int(self.request.retries or 0)
        model = str(job.params.get("model_name", settings.chem_model_name))
        version = str(job.params.get("model_version", settings.chem_model_version))
        if deliveries < settings.max_deliveries and not transition(
            session, job_id, JobState.RUNNING, actor=actor
        ):
            return "not-runnable"
    if deliveries >= settings.max_deliveries:
        error = (
            f"gave up after {deliveries} deliveries that ended without a result "
            "(worker killed or timed out each time); see the worker logs, then `medbatch retry`"
        )
        _close(job_id, parent_id, JobState.FAILED, settings, error=error)
        return "failed"

    items = _load_chunk(job_id, settings)
    if not items:
        _close(job_id, parent_id, JobState.DONE, settings, summary={"scored": 0})
        return "empty"
    try:
        arrays = featurize_smiles([smi for _, smi in items])
    except ValueError as exc:
        _close(job_id, parent_id, JobState.FAILED, settings, error=f"featurisation failed: {exc}")
        return "failed"

    started = time.perf_counter()
    try:
        out = triton_client.infer(
            settings.triton_grpc_url,
            model,
            version,
            arrays,
            OUTPUTS,
            timeout_s=settings.triton_timeout_s,
            request_id=f"chunk-{job_id}",
        )
    except InferenceUnavailableError as exc:
        TRITON_UNAVAILABLE.labels(model).inc()
        retries = int(self.request.retries or 0)
        if retries >= settings.triton_max_retries:
            _close(
                job_id,
                parent_id,
                JobState.FAILED,
                settings,
                error=(
                    f"Triton was unavailable through {retries} retries "
                    f"(about {settings.longest_backoff_total_s:.0f} s): {exc}. "
                    "Check `medbatch triton` / the triton service, then `medbatch retry`."
                ),
            )
            return "failed"
        countdown = backoff_s(settings, retries)
        with session_scope(settings.database_url) as session:
            transition(
                session,
                job_id,
                JobState.QUEUED,
                actor=actor,
                error=f"waiting for Triton (retry {retries + 1} of {settings.triton_max_retries} "
                f"in {countdown:.0f} s): {exc}",
            )
        raise self.retry(countdown=countdown, exc=exc) from exc
    except InferenceError as exc:
        _close(job_id, parent_id, JobState.FAILED, settings, error=str(exc))
        return "failed"

    TRITON_SECONDS.labels(model).observe(time.perf_counter() - started)
    logs = out["LOGS"].reshape(-1)
    if logs.shape[0] != len(items):
        _close(
            job_id,
            parent_id,
            JobState.FAILED,
            settings,
            error=f"model returned {logs.shape[0]} values for {len(items)} molecules",
        )
        return "failed"
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "compound_id": cid,
            "model_name": model,
            "model_version": version,
            "outputs": {"logS": float(v) if math.isfinite(float(v)) else None},
            "created_at": now,
        }
        for (cid, _), v in zip(items, logs, strict=True)
    ]
    with session_scope(settings.database_url) as session:
        inserted = insert_ignore(session, Prediction, rows, ("job_id", "compound_id", "model_name"))
        transition(
            session,
            job_id,
            JobState.DONE,
            actor=actor,
            summary={"scored": len(rows), "model": model, "model_version": version},
            details={"predictions": len(rows), "newly_stored": inserted},
        )
    CHUNKS.labels(JobKind.CHEM_CHUNK.value, JobState.DONE.value).inc()
    ITEMS.labels(JobKind.CHEM_CHUNK.value).inc(len(rows))
    log.info("chunk job %s: %d molecules scored by %s v%s", job_id, len(rows), model, version)
    if parent_id is not None:
        with session_scope(settings.database_url) as session:
            finish_parent_if_complete(session, parent_id, actor=actor)
    return "done"
