"""Job state machine, parent completion and idempotent inserts on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import func, select

from core.job_kinds import JobKind
from db import audit
from db.insert_ignore import insert_ignore
from db.jobs import finish_parent_if_complete, transition
from db.models import AuditEvent, Compound, Job, JobState, Prediction
from db.session import session_scope


def _job(url: str, key: str, parent: int | None = None, kind: str = JobKind.CHEM_CHUNK) -> int:
    with session_scope(url) as s:
        job = Job(kind=kind, source="t.smi", idempotency_key=key, parent_id=parent)
        s.add(job)
        s.flush()
        return int(job.id)


def test_happy_path_and_timings(db_url: str) -> None:
    jid = _job(db_url, "k1")
    with session_scope(db_url) as s:
        assert transition(s, jid, JobState.QUEUED, actor="t")
        assert transition(s, jid, JobState.RUNNING, actor="t")
        assert transition(s, jid, JobState.DONE, actor="t", summary={"scored": 3})
    with session_scope(db_url) as s:
        job = s.get(Job, jid)
        assert job is not None
        assert job.state == "done" and job.attempts == 1 and job.summary == {"scored": 3}
        assert job.queued_at and job.started_at and job.finished_at
        assert job.finished_at >= job.started_at >= job.queued_at
        actions = s.scalars(
            select(AuditEvent.action).where(AuditEvent.subject == f"job:{jid}")
        ).all()
        assert actions == ["job.queued", "job.running", "job.done"]


def test_illegal_transitions_are_refused(db_url: str) -> None:
    jid = _job(db_url, "k2")
    with session_scope(db_url) as s:
        assert not transition(s, jid, JobState.RUNNING, actor="t")  # received → running
        assert not transition(s, jid, JobState.DONE, actor="t")
        assert transition(s, jid, JobState.QUEUED, actor="t")
        assert transition(s, jid, JobState.RUNNING, actor="t")
        assert transition(s, jid, JobState.DONE, actor="t")
        assert not transition(s, jid, JobState.RUNNING, actor="t")  # done is final
        assert not transition(s, jid, JobState.FAILED, actor="t")
    with session_scope(db_url) as s:
        events = s.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.subject == f"job:{jid}")
        )
        assert events == 3  # refused transitions leave no audit event


def test_redelivery_counts_attempts(db_url: str) -> None:
    jid = _job(db_url, "k3")
    with session_scope(db_url) as s:
        transition(s, jid, JobState.QUEUED, actor="t")
        transition(s, jid, JobState.RUNNING, actor="t")
        assert transition(s, jid, JobState.RUNNING, actor="t")  # worker died, redelivered
        assert transition(s, jid, JobState.QUEUED, actor="t", error="waiting for Triton")
        assert transition(s, jid, JobState.RUNNING, actor="t")
        assert transition(s, jid, JobState.DONE, actor="t")
    with session_scope(db_url) as s:
        job = s.get(Job, jid)
        assert job is not None and job.attempts == 3 and job.error is None


def test_parent_finishes_only_when_all_children_are_terminal(db_url: str) -> None:
    parent = _job(db_url, "p", kind=JobKind.CHEM_SCREEN)
    kids = [_job(db_url, f"c{i}", parent=parent) for i in range(3)]
    with session_scope(db_url) as s:
        transition(s, parent, JobState.QUEUED, actor="t")
        for k in kids:
            transition(s, k, JobState.QUEUED, actor="t")
            transition(s, k, JobState.RUNNING, actor="t")
        transition(s, kids[0], JobState.DONE, actor="t")
        transition(s, kids[1], JobState.DONE, actor="t")
    with session_scope(db_url) as s:
        assert not finish_parent_if_complete(s, parent, actor="t")
    with session_scope(db_url) as s:
        transition(s, kids[2], JobState.FAILED, actor="t", error="Triton refused: bad input")
    with session_scope(db_url) as s:
        assert finish_parent_if_complete(s, parent, actor="t")
    with session_scope(db_url) as s:
        job = s.get(Job, parent)
        assert job is not None and job.state == "failed"
        assert job.error is not None and "1 of 3 chunks failed" in job.error
        assert "bad input" in job.error
        assert not finish_parent_if_complete(s, parent, actor="t")  # only once


def test_insert_ignore_stores_each_result_once(db_url: str) -> None:
    jid = _job(db_url, "k4")
    with session_scope(db_url) as s:
        s.add(Compound(inchikey="LFQSCWFLJHTTHZ-UHFFFAOYSA-N", canonical_smiles="CCO", library="t"))
        s.flush()
        cid = s.scalar(select(Compound.id))
    row = {
        "job_id": jid,
        "compound_id": cid,
        "model_name": "molecule_gnn",
        "model_version": "1",
        "outputs": {"logS": 1.1},
    }
    for _ in range(3):
        with session_scope(db_url) as s:
            insert_ignore(s, Prediction, [row, row], ("job_id", "compound_id", "model_name"))
    with session_scope(db_url) as s:
        assert s.scalar(select(func.count()).select_from(Prediction)) == 1


def test_audit_actor_names_a_worker() -> None:
    assert audit.current_actor("worker").startswith("worker:")
    assert audit.current_actor().startswith("user:")


def test_retry_requeues_failed_chunks_and_reopens_the_parent(db_url: str) -> None:
    from db.jobs import retry_failed

    parent = _job(db_url, "rp", kind=JobKind.CHEM_SCREEN)
    ok, bad = _job(db_url, "r1", parent=parent), _job(db_url, "r2", parent=parent)
    with session_scope(db_url) as s:
        transition(s, parent, JobState.QUEUED, actor="t")
        for k in (ok, bad):
            transition(s, k, JobState.QUEUED, actor="t")
            transition(s, k, JobState.RUNNING, actor="t")
        transition(s, ok, JobState.DONE, actor="t")
        transition(s, bad, JobState.FAILED, actor="t", error="Triton refused")
        finish_parent_if_complete(s, parent, actor="t")
    with session_scope(db_url) as s:
        assert retry_failed(s, parent, actor="ops") == [bad]
    with session_scope(db_url) as s:
        chunk, top = s.get(Job, bad), s.get(Job, parent)
        assert chunk is not None and chunk.state == "queued" and chunk.attempts == 0
        assert top is not None and top.state == "queued"
        assert retry_failed(s, parent, actor="ops") == []  # nothing failed any more
