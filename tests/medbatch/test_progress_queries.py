"""The progress that ``medbatch ehr`` and ``medbatch screen`` poll ten times a second: one
SELECT per poll, on SQLite and PostgreSQL, with the same answers as counting by hand."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from core.errors import NotFoundError
from core.job_kinds import JobKind
from core.settings import Settings
from db.models import Job, JobState
from db.session import get_engine, session_scope
from medbatch.services.ehr import extract_progress
from medbatch.services.jobs import job_progress
from tests.conftest import make_settings

_keys = itertools.count()


def _job(session: Session, kind: JobKind, state: JobState, parent: int | None, **kw: Any) -> int:
    job = Job(
        kind=kind.value,
        parent_id=parent,
        source="extract.csv",
        idempotency_key=f"progress-test-{next(_keys)}",
        state=state.value,
        **kw,
    )
    session.add(job)
    session.flush()
    return int(job.id)


@contextmanager
def _selects(url: str) -> Iterator[list[str]]:
    """The SELECT statements sent to the database meanwhile."""
    seen: list[str] = []

    def spy(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", spy)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", spy)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(tmp_path, database_url=db_url)


def test_extract_progress_in_one_select(settings: Settings) -> None:
    url = settings.database_url
    with session_scope(url) as session:
        extract = _job(session, JobKind.EHR_EXTRACT, JobState.RUNNING, None)
        _job(
            session,
            JobKind.EHR_INGEST,
            JobState.RUNNING,
            extract,
            params={"size_bytes": 1000},
            summary={"bytes_read": 400, "accepted_rows": 30, "rejected_rows": 2},
        )
        for state in (JobState.DONE, JobState.FAILED, JobState.RUNNING, JobState.QUEUED):
            _job(session, JobKind.EHR_BATCH, state, extract)
        other = _job(session, JobKind.EHR_EXTRACT, JobState.RUNNING, None)
        _job(session, JobKind.EHR_BATCH, JobState.DONE, other)  # not this extract's
    with _selects(url) as selects:
        p = extract_progress(settings, extract)
    assert len(selects) == 1
    assert (p.state, p.terminal, p.size_bytes, p.bytes_read) == ("running", False, 1000, 400)
    assert (p.accepted_rows, p.rejected_rows, p.ingest_done) == (30, 2, False)
    assert (p.batches_total, p.batches_finished) == (4, 2)

    fresh = extract_progress(settings, other)  # no ingest child: nothing read yet
    assert (fresh.size_bytes, fresh.bytes_read, fresh.batches_total) == (0, 0, 1)
    with pytest.raises(NotFoundError):
        extract_progress(settings, 10_000)


def test_job_progress_in_one_select(settings: Settings) -> None:
    url = settings.database_url
    with session_scope(url) as session:
        parent = _job(session, JobKind.EHR_EXTRACT, JobState.RUNNING, None)
        job = _job(session, JobKind.CHEM_SCREEN, JobState.DONE, parent)  # has a parent itself
        for state in (JobState.DONE, JobState.DONE, JobState.FAILED, JobState.RUNNING):
            _job(session, JobKind.CHEM_CHUNK, state, job)
        lone = _job(session, JobKind.CHEM_SCREEN, JobState.QUEUED, None)
    with _selects(url) as selects:
        p = job_progress(settings, job)
    assert len(selects) == 1
    assert (p.state, p.terminal, p.children_total, p.children_finished) == ("done", True, 4, 3)
    q = job_progress(settings, lone)
    assert (q.state, q.terminal, q.children_total, q.children_finished) == ("queued", False, 0, 0)
    with pytest.raises(NotFoundError):
        job_progress(settings, 10_000)
