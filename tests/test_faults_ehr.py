"""Fault injection on the EHR path with the real stack: the worker SIGKILLed in the middle of
streaming a large extract, and while scoring a batch. The redelivered tasks finish the work; no
patient is lost or scored twice, no rejected row is recorded twice."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.job_kinds import JobKind
from db.models import EhrScore, Job, JobState, Rejection
from db.session import session_scope
from ingest.ehr.reader import read_extract
from ingest.ehr.submit import submit_extract
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.triton_server import is_ready
from medbatch.synth.ehr import write_long_csv
from tests.helpers import job_state, wait_for_job, wait_until
from workers.dispatch import publish
from workers.sweeper import sweep

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _live_worker(stack: EmbeddedStack) -> None:
    if not any(w.alive() for w in stack.workers):
        stack.add_worker()


def _children(settings, extract_id: int, kind: JobKind) -> list[Job]:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(select(Job).where(Job.parent_id == extract_id, Job.kind == kind.value))
        )


def _check_complete(settings, extract_id: int, path: Path, broken: int) -> None:  # type: ignore[no-untyped-def]
    done = wait_for_job(settings, extract_id, timeout=settings.visibility_timeout_s + 300)
    assert done.state == JobState.DONE.value, done.error
    patients = {p for b in read_extract(path) for p in b.patient_id.to_pylist()}
    with session_scope(settings.database_url) as session:
        per_model = dict(
            session.execute(
                select(EhrScore.model_name, func.count())
                .where(EhrScore.extract_id == extract_id)
                .group_by(EhrScore.model_name)
            ).all()
        )
        rejected = session.scalar(
            select(func.count()).select_from(Rejection).where(Rejection.job_id == extract_id)
        )
    assert per_model == {"diabetes_lstm_attention": len(patients), "cvd_autoencoder": len(patients)}
    assert rejected == broken


def test_worker_killed_mid_ingest_loses_and_duplicates_nothing(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    _live_worker(stack)
    path = tmp_path / "kill-ingest.csv"
    stats = write_long_csv(path, 12_000, seed=99, messiness=0.01)  # ~0.5 M rows: seconds to read
    sub = submit_extract(path, s, publish)
    assert sub.ingest_id is not None
    ingest_id = sub.ingest_id

    def reading_after_a_release() -> bool:
        """Mid-file, after the first early bucket's job (the file is grouped by patient): the
        second delivery must then supersede what the first one handed out."""
        with session_scope(s.database_url) as session:
            job = session.get_one(Job, ingest_id)
            released = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.parent_id == sub.job_id, Job.kind == JobKind.EHR_BATCH.value)
            )
            return job.state == "running" and bool(released)

    wait_until(reading_after_a_release, 60, "the ingest to release an early bucket", every=0.02)
    for w in stack.workers:
        w.kill()  # SIGKILL, pool child included, in the middle of the file
    assert job_state(s, ingest_id) == "running"
    # nothing half-published: only early buckets of complete patients (the file is grouped by
    # patient, ingest/ehr/release.py) can have jobs before the end of the file
    early = _children(s, sub.job_id, JobKind.EHR_BATCH)
    assert all(":early:" in (j.idempotency_key or "") for j in early), early

    stack.add_worker()

    # an early job committed just before the kill may never have been published: beat's sweeper
    # re-sends such jobs (this stack runs without beat, so the test sweeps)
    def swept_and_ended() -> bool:
        sweep(s)
        return job_state(s, sub.job_id) in ("done", "failed")

    wait_until(swept_and_ended, s.visibility_timeout_s + 300, "the extract to end", every=1.0)
    _check_complete(s, sub.job_id, path, stats.broken_rows)
    (ingest,) = _children(s, sub.job_id, JobKind.EHR_INGEST)
    assert ingest.attempts == 2
    # the second delivery released nothing early: its buckets, which hold every patient,
    # replace what the first one's early buckets scored (each patient counted once above)
    assert early
    late = [
        j for j in _children(s, sub.job_id, JobKind.EHR_BATCH) if j.id not in {e.id for e in early}
    ]
    assert late and all(":early:" not in (j.idempotency_key or "") for j in late)
    assert all(j.params.get("supersede") for j in late)


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    _live_worker(stack)
    assert stack.triton is not None
    path = tmp_path / "kill-batch.csv"
    stats = write_long_csv(path, 400, seed=98, messiness=0.02)
    stack.triton.signal_group(signal.SIGSTOP)  # Triton hangs: the batch blocks inside infer()
    try:
        sub = submit_extract(path, s, publish)

        def batch_running() -> bool:
            return any(j.state == "running" for j in _children(s, sub.job_id, JobKind.EHR_BATCH))

        wait_until(batch_running, 120, "a batch to be scoring")
        for w in stack.workers:
            w.kill()
    finally:
        stack.triton.signal_group(signal.SIGCONT)
    stack.add_worker()
    _check_complete(s, sub.job_id, path, stats.broken_rows)
    batches = _children(s, sub.job_id, JobKind.EHR_BATCH)
    assert max(b.attempts for b in batches) == 2


def test_batches_wait_while_triton_is_down_and_finish_when_it_returns(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    _live_worker(stack)
    assert stack.triton is not None
    path = tmp_path / "triton-down.csv"
    stats = write_long_csv(path, 300, seed=97, messiness=0.02)
    stack.triton.stop()
    assert not is_ready(s)
    try:
        sub = submit_extract(path, s, publish)

        def retrying() -> bool:
            batches = _children(s, sub.job_id, JobKind.EHR_BATCH)
            return bool(batches) and all(
                b.attempts >= 2 and "waiting for Triton" in (b.error or "") for b in batches
            )

        wait_until(retrying, 90, "the batches to be retrying")
        assert job_state(s, sub.job_id) == "queued"
    finally:
        stack.start_triton_server()
    _check_complete(s, sub.job_id, path, stats.broken_rows)
    for batch in _children(s, sub.job_id, JobKind.EHR_BATCH):
        assert batch.error is None and batch.attempts >= 2
