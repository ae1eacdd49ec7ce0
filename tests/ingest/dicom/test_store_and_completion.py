"""Durable storage and study completion on SQLite and PostgreSQL (no network)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from db.models import AuditEvent, DicomInstance, DicomStudy, Job, JobState, utcnow
from db.session import session_scope
from ingest.dicom.completion import close_quiet_studies
from ingest.dicom.files import relative_path
from ingest.dicom.store import InstanceStore, Sender
from ingest.dicom.validate import inspect_instance
from medbatch.settings import Settings
from tests.dicom_data import make_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def _settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(storage_dir=tmp_path, database_url=db_url, dicom_quiet_period_s=30)  # type: ignore[call-arg]


def _store(settings: Settings, paths: list[Path]) -> list[bool]:
    store = InstanceStore(settings)
    try:
        results = [
            store.store(p.read_bytes(), Sender("CT1", "10.0.0.1"), sop_class_uid=CT) for p in paths
        ]
    finally:
        store.close()
    assert all(r.ok for r in results), results
    return [r.stored for r in results]


def test_instances_are_stored_once_in_a_study_series_layout(tmp_path: Path, db_url: str) -> None:
    s = _settings(tmp_path, db_url)
    paths = make_series(tmp_path / "in", 3)
    assert _store(s, paths) == [True, True, True]
    assert _store(s, paths[:1]) == [False]  # a resend
    with session_scope(db_url) as session:
        rows = session.scalars(select(DicomInstance)).all()
        study = session.scalars(select(DicomStudy)).one()
        dup = session.scalar(select(func.count()).where(AuditEvent.action == "dicom.duplicate"))
    assert len(rows) == 3 and study.instance_count == 3 and dup == 1
    for row in rows:
        stored = s.dicom_storage_dir / row.path
        assert stored.read_bytes()[128:132] == b"DICM"
        inst = inspect_instance(stored.read_bytes(), context_sop_class=CT)
        assert stored == s.dicom_storage_dir / relative_path(inst)
    assert not list(s.dicom_storage_dir.rglob("*.tmp"))


def test_a_quiet_study_closes_once_and_late_instances_make_a_new_version(
    tmp_path: Path, db_url: str
) -> None:
    s = _settings(tmp_path, db_url)
    paths = make_series(tmp_path / "in", 5)
    _store(s, paths[:4])
    assert close_quiet_studies(s, actor="t") == []  # not quiet yet
    later = utcnow() + timedelta(seconds=31)
    first = close_quiet_studies(s, actor="t", now=later)
    assert len(first) == 1
    assert close_quiet_studies(s, actor="t", now=later) == []  # exactly one job per version
    _store(s, paths[4:])  # a late instance re-opens the study
    second = close_quiet_studies(s, actor="t", now=utcnow() + timedelta(seconds=31))
    assert len(second) == 1 and second != first
    with session_scope(db_url) as session:
        jobs = {j.id: j for j in session.scalars(select(Job))}
        batches = sorted(session.scalars(select(DicomInstance.batch)).all())
    assert jobs[first[0]].params["version"] == 1 and jobs[first[0]].item_count == 4
    assert jobs[second[0]].params["version"] == 2 and jobs[second[0]].item_count == 5
    assert all(j.state == JobState.QUEUED.value for j in jobs.values())
    assert batches == [1, 1, 1, 1, 2]
