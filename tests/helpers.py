"""Small helpers shared by the server tests (waiting on real jobs, writing real libraries)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from core.settings import Settings
from db.models import TERMINAL_STATES, Job, JobState, Prediction
from db.session import session_scope
from ingest.chem.canonicalize import Canonical, canonicalize


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(settings: Settings, job_id: int) -> str:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def wait_for_job(settings: Settings, job_id: int, timeout: float = 180) -> Job:
    wait_until(
        lambda: JobState(job_state(settings, job_id)) in TERMINAL_STATES,
        timeout,
        f"job {job_id} to finish",
    )
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def chunk_jobs(settings: Settings, parent_id: int) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.id)))


def predictions_for(settings: Settings, parent_id: int) -> list[Prediction]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Prediction)
                .join(Job, Job.id == Prediction.job_id)
                .where(Job.parent_id == parent_id)
            )
        )


def prediction_count(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Prediction)) or 0)


def unique_valid(rows: list[tuple[str, str]], n: int, skip: int = 0) -> list[tuple[str, str, str]]:
    """The first ``n`` molecules (after ``skip``) that are valid and distinct by InChIKey."""
    seen: set[str] = set()
    out = []
    for smi, name in rows[skip:]:
        result = canonicalize(smi)
        if isinstance(result, Canonical) and result.inchikey not in seen:
            seen.add(result.inchikey)
            out.append((smi, name, result.inchikey))
            if len(out) == n:
                break
    return out


def write_smi(path: Path, lines: list[str]) -> Path:
    path.write_text("smiles\tname\n" + "\n".join(lines) + "\n")
    return path
