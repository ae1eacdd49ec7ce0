"""Score one bucket of an extract's patients with every EHR model and store the results.

Idempotent: scores are inserted with ON CONFLICT DO NOTHING on (extract, patient, model), so a
redelivered batch (worker killed, Triton restarted mid-batch) stores each patient's score once. A
batch marked ``supersede`` (some of its patients were scored early on part of their rows,
``ingest/ehr/release.py``) replaces instead: its scores are the ones on all of a patient's rows.
Results are committed every :data:`_COMMIT_ROWS` rows; the bucket file is removed only after the
job is ``done``, so an operator's retry of a failed batch finds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from celery import Task
from sqlalchemy import delete, func, select

from core.errors import (
    InferenceError,
    InferenceUnavailableError,
    StorageError,
    StorageUnavailableError,
)
from core.job_kinds import JobKind
from core.model_registry import served_model
from core.settings import Settings
from core.storage import storage_for
from db import audit
from db.ehr_results import insert_scores
from db.models import EhrScore, Job, JobState, utcnow
from db.session import session_scope
from ingest.ehr.spill import read_bucket
from workers.ehr.scoring import (
    ModelBatch,
    Patient,
    build_inputs,
    not_scored_rows,
    patients,
    score_rows,
)
from workers.lifecycle import (
    Claim,
    claim,
    close,
    infer_or_wait,
    job_task,
    triton_infer,
    wait_for_triton,
)
from workers.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
from workers.metrics import ITEMS

log = logging.getLogger(__name__)


def _infer_isolating(
    task: Task, job: Claim, settings: Settings, batch: ModelBatch, version: str
) -> list[dict[str, Any]] | str:
    """Score ``batch``; if Triton refuses the request, split it until the refused patients are
    alone, and record them as not scored with Triton's reason: one patient's inputs never fail
    the other patients of the batch."""
    if not batch.patients:
        return []
    try:
        out = infer_or_wait(
            task,
            job,
            settings,
            batch.model,
            version,
            batch.inputs,
            list(served_model(batch.model, settings).outputs),
            fail_on_refusal=False,
        )
    except InferenceError as exc:
        if len(batch.patients) == 1:
            return not_scored_rows(batch.model, version, [(batch.patients[0], str(exc))])
        half = len(batch.patients) // 2
        first = _infer_isolating(task, job, settings, batch.subset(range(half)), version)
        if isinstance(first, str):
            return first
        rest = _infer_isolating(
            task, job, settings, batch.subset(range(half, len(batch.patients))), version
        )
        return rest if isinstance(rest, str) else first + rest
    if isinstance(out, str):
        return out
    return _rows_from(job, settings, batch, out, version)


def _rows_from(
    job: Claim, settings: Settings, batch: ModelBatch, out: dict[str, np.ndarray], version: str
) -> list[dict[str, Any]] | str:
    if out["RISK"].shape[0] != len(batch.patients):
        close(
            job,
            JobState.FAILED,
            settings,
            error=f"{batch.model} returned {out['RISK'].shape[0]} risks for "
            f"{len(batch.patients)} patients",
        )
        return "failed"
    return score_rows(batch, out, version)


#: Result rows committed per transaction: each commit is an fsync (SQLite ``synchronous=FULL``,
#: PostgreSQL's WAL flush), ~8 ms here, once per 256 patients was ~12 % of a batch's time. A
#: worker killed before a commit re-scores those patients on redelivery; nothing is stored twice.
_COMMIT_ROWS = 4096


class _Pipeline:
    """Scores groups of patients so that the CPU work of the next group (features) overlaps the
    Triton calls of the current one, and both models' calls run at once (the server has an
    instance of each). Keeps per-stage seconds for the job summary."""

    def __init__(self, task: Task, job: Claim, settings: Settings) -> None:
        self.task, self.job, self.settings = task, job, settings
        self.models: dict[str, str] = dict(job.params["models"])
        self.pool = ThreadPoolExecutor(max_workers=len(self.models))
        self.pending: list[
            tuple[list[dict[str, Any]], list[tuple[ModelBatch, str, Future[Any] | None]]]
        ] = []
        self.seconds = {"features": 0.0, "triton_wait": 0.0, "store": 0.0}
        self.unstored: list[dict[str, Any]] = []
        self.patients = self.stored = 0

    def submit(self, group: list[Patient]) -> str | None:
        """Build this group's inputs and send them; then finish the previous group."""
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        calls: list[tuple[ModelBatch, str, Future[Any] | None]] = []
        for model, version in self.models.items():
            batch = build_inputs(model, group)
            rows.extend(not_scored_rows(model, version, batch.skipped))
            future = (
                self.pool.submit(
                    triton_infer,
                    self.settings,
                    self.job.job_id,
                    model,
                    version,
                    batch.inputs,
                    list(served_model(model, self.settings).outputs),
                )
                if batch.patients
                else None
            )
            calls.append((batch, version, future))
        self.seconds["features"] += time.perf_counter() - t0
        self.patients += len(group)
        outcome = self.drain() if self.pending else None
        self.pending.append((rows, calls))
        return outcome

    def drain(self) -> str | None:
        """Wait for the oldest group's outputs and store them; the outcome word if the job ended."""
        rows, calls = self.pending.pop(0)
        for batch, version, future in calls:
            if future is None:
                continue
            t0 = time.perf_counter()
            try:
                out = future.result()
            except InferenceUnavailableError as exc:  # Retry unless the retries are spent
                return wait_for_triton(self.task, self.job, self.settings, exc, batch.model)
            except InferenceError:  # some patient's inputs were refused: find them
                scored = _infer_isolating(self.task, self.job, self.settings, batch, version)
            else:
                scored = _rows_from(self.job, self.settings, batch, out, version)
            self.seconds["triton_wait"] += time.perf_counter() - t0
            if isinstance(scored, str):
                return scored
            rows.extend(scored)
        self.unstored.extend(rows)
        if len(self.unstored) >= _COMMIT_ROWS:
            self.store()
        return None

    def store(self) -> None:
        """Commit the scored rows not stored yet, in one transaction."""
        t0 = time.perf_counter()
        now = utcnow()
        for row in self.unstored:
            row.update(extract_id=self.job.parent_id, job_id=self.job.job_id, created_at=now)
        with session_scope(self.settings.database_url) as session:
            self.stored += insert_scores(
                session, self.unstored, replace=bool(self.job.params.get("supersede"))
            )
        self.unstored = []
        self.seconds["store"] += time.perf_counter() - t0

    def finish(self) -> str | None:
        """Store every group still in flight; the outcome word if the job ended."""
        while self.pending:
            if outcome := self.drain():
                return outcome
        if self.unstored:
            self.store()
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _groups(path: Path | pa.Buffer, size: int) -> Iterator[list[Patient]]:
    group: list[Patient] = []
    for patient in patients(read_bucket(path)):
        group.append(patient)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _bucket(settings: Settings, spool: str) -> Path | pa.Buffer | None:
    """The bucket a batch job names: its file (local storage; an absolute path in jobs queued
    before storage keys), or its bytes from a shared store; None when it is gone. An
    unreachable store raises StorageUnavailableError (the job waits and retries)."""
    storage = storage_for(settings)
    local = Path(spool) if Path(spool).is_absolute() else storage.local_path(spool)
    if local is not None:
        return local if local.is_file() else None
    try:
        return pa.py_buffer(storage.get(spool))
    except StorageUnavailableError:
        raise
    except StorageError:
        return None


def _drop_bucket(settings: Settings, spool: str) -> None:
    """A scored bucket is not needed again (a rescore spills the extract anew)."""
    if Path(spool).is_absolute():
        Path(spool).unlink(missing_ok=True)
        return
    try:
        storage_for(settings).delete(spool)
    except StorageError as exc:  # an orphan bucket costs space, not correctness
        log.warning("could not delete a scored EHR bucket: %s", exc)


def _extract_rejected(settings: Settings, job: Claim) -> str | None:
    """An early bucket scored while its extract's ingest went on, and the ingest then rejected
    the file: the scores this job stored are removed (the ingest removed those stored before it
    rejected); the extract's error, else None. Checked after this job's last commit, so that
    whichever of the two ends last removes them."""
    with session_scope(settings.database_url) as session:
        extract = session.get(Job, job.parent_id)
        if extract is None or extract.state != JobState.REJECTED.value:
            return None
        session.execute(delete(EhrScore).where(EhrScore.job_id == job.job_id))
        return extract.error or "rejected"


@job_task(JobKind.EHR_BATCH)
def score_batch(self: Task, job_id: int, settings: Settings) -> str:
    job = claim(self, job_id, settings)
    if isinstance(job, str):
        return job
    spool = str(job.params["spool_file"])
    path = _bucket(settings, spool)
    if path is None:
        close(
            job,
            JobState.FAILED,
            settings,
            error=f"the patients of this batch ({spool.rsplit('/', 1)[-1]}) are gone from "
            "storage; submit the extract again with `medbatch ehr FILE --force`",
        )
        return "failed"
    reset_peak_rss()
    rss_start = current_rss_mb()
    started = time.perf_counter()
    pipeline = _Pipeline(self, job, settings)
    try:
        outcome = None
        for group in _groups(path, settings.ehr_triton_batch):
            if outcome := pipeline.submit(group):
                break
        outcome = outcome or pipeline.finish()
        if outcome and pipeline.unstored:
            pipeline.store()  # what was scored before the job ended is kept, as it was per group
    finally:
        pipeline.close()
    if outcome:
        return outcome
    if rejected := _extract_rejected(settings, job):
        close(job, JobState.REJECTED, settings, error=f"its extract was rejected: {rejected}")
        _drop_bucket(settings, spool)
        return "rejected"
    n_patients, stored = pipeline.patients, pipeline.stored
    with session_scope(settings.database_url) as session:
        ood = int(
            session.scalar(
                select(func.count())
                .select_from(EhrScore)
                .where(EhrScore.job_id == job_id, EhrScore.out_of_distribution.is_(True))
            )
            or 0
        )
        audit.append(
            session,
            actor=audit.current_actor("worker"),
            action="ehr.scored",
            subject=f"job:{job_id}",
            details={"patients": n_patients, "stored": stored, "models": job.params["models"]},
        )
    ITEMS.labels(job.kind).inc(n_patients)
    summary = {
        "patients": n_patients,
        "scores_stored": stored,
        "out_of_distribution": ood,
        "seconds": round(time.perf_counter() - started, 3),
        "stage_seconds": {k: round(v, 3) for k, v in pipeline.seconds.items()},
        "rss_start_mb": round(rss_start, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    close(job, JobState.DONE, settings, summary=summary)
    _drop_bucket(settings, spool)
    log.info("ehr batch job %s: %d patients scored", job_id, n_patients)
    return "done"
