"""An extract rejected after early buckets were handed out keeps no score: the ingest rejects the
queued early jobs and removes what was stored; an early job still running removes its own rows
when it ends (whichever of the two ends last removes them)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from core.job_kinds import JobKind
from core.settings import Settings
from db.ehr_results import insert_scores
from db.models import EhrScore, Job, JobState, utcnow
from db.session import session_scope
from workers.ehr.partition import _reject
from workers.ehr.tasks import _extract_rejected
from workers.lifecycle import Claim


def _job(session, kind: JobKind, state: JobState, parent: int | None, key: str) -> int:  # type: ignore[no-untyped-def]
    job = Job(
        kind=kind.value,
        parent_id=parent,
        source="night.csv",
        idempotency_key=key,
        state=state.value,
        queued_at=utcnow(),
        params={"path": "/data/night.csv", "models": {"cvd_autoencoder": "1"}},
    )
    session.add(job)
    session.flush()
    return int(job.id)


def _score(extract: int, job: int, patient: str) -> dict[str, object]:
    return {
        "extract_id": extract,
        "job_id": job,
        "patient_id": patient,
        "model_name": "cvd_autoencoder",
        "model_version": "1",
        "risk": 0.5,
        "not_scored": None,
        "out_of_distribution": False,
        "reconstruction_error": 0.1,
        "visits": 3,
        "measurements": 30,
        "explanation": {},
        "created_at": utcnow(),
    }


def test_a_rejected_extract_keeps_no_score_from_its_early_buckets(
    db_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=db_url, storage_dir=tmp_path)
    with session_scope(db_url) as session:
        extract = _job(session, JobKind.EHR_EXTRACT, JobState.RUNNING, None, "ehr_extract:x")
        ingest = _job(session, JobKind.EHR_INGEST, JobState.RUNNING, extract, "ehr_ingest:x")
        done = _job(session, JobKind.EHR_BATCH, JobState.DONE, extract, "ehr_batch:x:early:0")
        running = _job(session, JobKind.EHR_BATCH, JobState.RUNNING, extract, "ehr_batch:x:early:1")
        queued = _job(session, JobKind.EHR_BATCH, JobState.QUEUED, extract, "ehr_batch:x:early:2")
        insert_scores(session, [_score(extract, done, "P1"), _score(extract, running, "P2")])
    params = {"path": "/data/night.csv", "models": {"cvd_autoencoder": "1"}}
    assert _reject(Claim(ingest, JobKind.EHR_INGEST.value, extract, params), settings, "bad", {})

    with session_scope(db_url) as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
        assert states[extract] == states[ingest] == states[queued] == JobState.REJECTED.value
        assert states[done] == JobState.DONE.value and states[running] == JobState.RUNNING.value
        assert session.scalars(select(EhrScore.id)).all() == []
        # the running early job commits its last rows after the ingest's removal …
        insert_scores(session, [_score(extract, running, "P3")])
    # … and removes them itself when it sees its extract rejected
    claim = Claim(running, JobKind.EHR_BATCH.value, extract, params)
    assert _extract_rejected(settings, claim) == "bad"
    with session_scope(db_url) as session:
        assert session.scalars(select(EhrScore.id)).all() == []
    # an extract that is not rejected: nothing removed
    with session_scope(db_url) as session:
        other = _job(session, JobKind.EHR_EXTRACT, JobState.RUNNING, None, "ehr_extract:y")
        batch = _job(session, JobKind.EHR_BATCH, JobState.RUNNING, other, "ehr_batch:y:early:0")
        insert_scores(session, [_score(other, batch, "P9")])
    assert _extract_rejected(settings, Claim(batch, JobKind.EHR_BATCH.value, other, params)) is None
    with session_scope(db_url) as session:
        assert len(session.scalars(select(EhrScore.id)).all()) == 1
