"""Fault injection on the real stack: a worker SIGKILLed mid-chunk, Triton stopped while jobs wait,
a message delivered twice, Redis losing its queue. Nothing accepted is lost or stored twice."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from db.models import AuditEvent, Job, JobState
from db.session import session_scope
from ingest.chem.submit import submit_library
from medbatch.cli import app
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.triton_server import is_ready
from tests.helpers import (
    chunk_jobs,
    job_state,
    predictions_for,
    unique_valid,
    wait_for_job,
    wait_until,
    write_smi,
)
from workers.dispatch import publish
from workers.sweeper import job_ids_in_broker, sweep

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _library(tmp: Path, rows: list[tuple[str, str]], n: int, skip: int, name: str) -> Path:
    mols = unique_valid(rows, n, skip=skip)
    return write_smi(tmp / name, [f"{s}\t{m}" for s, m, _ in mols])


def _audit_actions(settings, job_id: int) -> list[str]:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as s:
        return list(
            s.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.subject == f"job:{job_id}")
                .order_by(AuditEvent.seq)
            )
        )


def _live_worker(stack: EmbeddedStack) -> None:
    if not any(w.alive() for w in stack.workers):
        stack.add_worker()


def test_sigkilled_worker_mid_chunk_loses_nothing(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    _live_worker(stack)
    assert stack.triton is not None
    library = _library(tmp_path, nci_smiles, settings.chem_chunk_size, 1000, "kill.smi")
    stack.triton.signal_group(signal.SIGSTOP)  # Triton hangs: the worker blocks inside infer()
    try:
        res = submit_library(library, settings, publish)
        (chunk_id,) = res.chunk_ids
        wait_until(lambda: job_state(settings, chunk_id) == "running", 60, "the chunk to start")
        for w in stack.workers:
            w.kill()  # SIGKILL the whole worker, pool children included, mid-chunk
    finally:
        stack.triton.signal_group(signal.SIGCONT)
    assert job_state(settings, chunk_id) == "running"
    assert predictions_for(settings, res.job_id) == []

    stack.add_worker()  # the replacement picks up the unacknowledged message
    done = wait_for_job(settings, res.job_id, timeout=settings.visibility_timeout_s + 120)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(settings, res.job_id)
    assert len(preds) == settings.chem_chunk_size
    assert len({p.compound_id for p in preds}) == len(preds)
    (chunk,) = chunk_jobs(settings, res.job_id)
    assert chunk.attempts == 2
    assert _audit_actions(settings, chunk_id).count("job.running") == 2


def test_jobs_wait_while_triton_is_down_and_finish_when_it_returns(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    _live_worker(stack)
    assert stack.triton is not None
    library = _library(tmp_path, nci_smiles, 2 * settings.chem_chunk_size, 1100, "down.smi")
    stack.triton.stop()
    assert not is_ready(settings)
    try:
        res = submit_library(library, settings, publish)
        assert len(res.chunk_ids) == 2

        def retrying() -> bool:
            chunks = chunk_jobs(settings, res.job_id)
            return all(c.attempts >= 2 and "waiting for Triton" in (c.error or "") for c in chunks)

        wait_until(retrying, 90, "both chunks to be retrying")
        assert all(c.state in ("queued", "running") for c in chunk_jobs(settings, res.job_id))
        assert job_state(settings, res.job_id) == "queued"
    finally:
        stack.start_triton_server()
    done = wait_for_job(settings, res.job_id, timeout=120)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(settings, res.job_id)
    assert len(preds) == 2 * settings.chem_chunk_size == len({p.compound_id for p in preds})
    for chunk in chunk_jobs(settings, res.job_id):
        assert chunk.error is None and chunk.attempts >= 2
        assert "job.queued" in _audit_actions(settings, chunk.id)[2:]  # a retry, after the first


def test_duplicate_delivery_stores_results_once(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    _live_worker(stack)
    library = _library(tmp_path, nci_smiles, 5, 1200, "dup.smi")
    res = submit_library(library, settings, publish)
    (chunk_id,) = res.chunk_ids
    publish(chunk_id, "chem_chunk")  # the same job delivered twice more
    publish(chunk_id, "chem_chunk")
    wait_for_job(settings, res.job_id)
    client = redis.Redis.from_url(settings.broker_url)
    wait_until(
        lambda: chunk_id not in job_ids_in_broker(client, [settings.queue_chem]),
        60,
        "the duplicate messages to be consumed",
    )
    assert len(predictions_for(settings, res.job_id)) == 5
    (chunk,) = chunk_jobs(settings, res.job_id)
    assert chunk.attempts == 1


def test_messages_lost_by_redis_are_republished_by_the_sweeper(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    for w in stack.workers:
        w.stop()
    library = _library(tmp_path, nci_smiles, settings.chem_chunk_size + 3, 1300, "lost.smi")
    res = submit_library(library, settings, publish)
    client = redis.Redis.from_url(settings.broker_url)
    assert set(res.chunk_ids) <= job_ids_in_broker(client, [settings.queue_chem])
    client.flushall()  # Redis restarted without persistence: the queue is gone
    assert job_ids_in_broker(client, [settings.queue_chem]) == set()

    # (other tests' jobs in the shared stack may be swept too: look at this library's chunks)
    mine = set(res.chunk_ids)
    assert not mine & set(sweep(settings).republished)  # too recent: inside the grace period
    wait_until(
        lambda: mine & set(sweep(settings).republished) == mine,
        settings.sweep_grace_s + 30,
        "the sweeper to re-publish the lost chunks",
        every=1.0,
    )
    assert not mine & set(sweep(settings).republished)  # present again: not sent twice
    stack.add_worker()
    done = wait_for_job(settings, res.job_id, timeout=120)
    assert done.state == JobState.DONE.value
    assert len(predictions_for(settings, res.job_id)) == settings.chem_chunk_size + 3
    with session_scope(settings.database_url) as s:
        republished = s.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "job.republished")
        )
    assert republished >= len(res.chunk_ids)


def test_retries_exhausted_fail_the_job_with_a_clear_reason(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    """A worker whose Triton never comes back gives up after its retries and says so."""
    from medbatch.stack.process import free_port
    from medbatch.stack.worker_process import use_settings, worker_process, worker_ready

    base = stack.settings
    nowhere = base.model_copy(
        update={
            "triton_grpc_port": free_port(),  # nothing listens there
            "triton_max_retries": 2,
            "triton_retry_base_s": 0.2,
            "queue_chem": "chem-isolated",  # keep the session's worker out of it
        }
    )
    library = _library(tmp_path, nci_smiles, 3, 1400, "never.smi")
    proc = worker_process(nowhere, tmp_path, queues=["chem-isolated"]).start()
    try:
        proc.wait_until(lambda: worker_ready(proc), 120, "ready")
        use_settings(nowhere)
        res = submit_library(library, nowhere, publish)
        job = wait_for_job(nowhere, res.job_id, timeout=120)
    finally:
        use_settings(base)
        proc.stop()
    assert job.state == JobState.FAILED.value
    (chunk,) = chunk_jobs(base, res.job_id)
    assert chunk.state == JobState.FAILED.value and chunk.attempts == 3
    assert "Triton was unavailable through 2 retries" in (chunk.error or "")
    assert "medbatch retry" in (chunk.error or "")
    assert "1 of 1 chunks failed" in (job.error or "")
    assert predictions_for(base, res.job_id) == []

    # Triton is reachable for the session's worker: `medbatch retry` re-queues the failed chunk.
    _live_worker(stack)
    result = CliRunner().invoke(app, ["retry", str(res.job_id)])
    assert result.exit_code == 0 and "re-queued 1 job" in result.output, result.output
    assert wait_for_job(base, res.job_id, timeout=120).state == JobState.DONE.value
    assert len(predictions_for(base, res.job_id)) == 3
    (chunk,) = chunk_jobs(base, res.job_id)
    assert chunk.state == "done" and chunk.error is None


def test_a_chunk_that_keeps_killing_its_worker_is_failed_not_retried_forever(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    _live_worker(stack)
    held: list[int] = []
    library = _library(tmp_path, nci_smiles, 4, 1500, "poison.smi")
    res = submit_library(library, settings, lambda job_id, kind: held.append(job_id))
    (chunk_id,) = held
    with session_scope(settings.database_url) as s:  # as after five deliveries that died
        s.execute(
            update(Job)
            .where(Job.id == chunk_id)
            .values(state="running", attempts=settings.max_deliveries)
        )
    publish(chunk_id, "chem_chunk")
    job = wait_for_job(settings, res.job_id, timeout=60)
    assert job.state == JobState.FAILED.value
    (chunk,) = chunk_jobs(settings, res.job_id)
    assert chunk.state == "failed" and "gave up after 5 deliveries" in (chunk.error or "")
    assert predictions_for(settings, res.job_id) == []


def test_redis_restart_mid_run_loses_and_duplicates_nothing(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    """Redis restarts (append-only file on) while one chunk runs and another waits in its queue."""
    settings = stack.settings
    _live_worker(stack)
    assert stack.triton is not None and stack.redis is not None
    n = 2 * settings.chem_chunk_size
    library = _library(tmp_path, nci_smiles, n, 1600, "restart.smi")
    stack.triton.signal_group(signal.SIGSTOP)  # hold the first chunk inside infer()
    try:
        res = submit_library(library, settings, publish)
        first, second = res.chunk_ids
        wait_until(lambda: job_state(settings, first) == "running", 60, "the first chunk to start")
        client = redis.Redis.from_url(settings.broker_url)
        assert second in job_ids_in_broker(client, [settings.queue_chem])
        stack.redis.stop()  # SIGTERM: redis-server syncs its append-only file and exits
        stack.start_redis_server()
        assert {first, second} <= job_ids_in_broker(client, [settings.queue_chem])
    finally:
        stack.triton.signal_group(signal.SIGCONT)
    done = wait_for_job(settings, res.job_id, timeout=settings.visibility_timeout_s + 120)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(settings, res.job_id)
    assert len(preds) == n == len({p.compound_id for p in preds})
    assert all(c.state == "done" for c in chunk_jobs(settings, res.job_id))
