"""Durable storage and study completion on SQLite and PostgreSQL (no network)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from core.settings import Settings
from db.models import AuditEvent, DicomInstance, DicomRejection, DicomStudy, Job, JobState, utcnow
from db.session import session_scope
from ingest.dicom.completion import close_quiet_studies
from ingest.dicom.files import relative_path
from ingest.dicom.store import InstanceStore, Sender
from ingest.dicom.validate import inspect_instance
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


def test_any_front_door_gets_the_same_store(tmp_path: Path, db_url: str) -> None:
    """What a DICOMweb STOW-RS handler would do: file-format bytes and a client identity, no
    negotiated context; refusals come back with their status, reason and rejection row."""
    s = _settings(tmp_path, db_url)
    good = make_series(tmp_path / "in", 1)[0].read_bytes()
    sr = Path(str(get_testdata_file("test-SR.dcm"))).read_bytes()
    client = Sender("STOW:reader-7", "10.1.2.3")
    store = InstanceStore(s)
    try:
        stored = store.store(good, client)
        again = store.store(good, client)
        refused = store.store(sr, client)
        garbage = store.store(b"\x00" * 128 + b"DICM" + b"\xff" * 50, client)
    finally:
        store.close()
    assert stored.ok and stored.stored and stored.study_id is not None
    assert again.ok and not again.stored and again.study_id == stored.study_id
    assert refused.status == 0xA900 and "not an image" in refused.comment
    assert garbage.status == 0xC000 and len(garbage.comment) <= 64
    with session_scope(db_url) as session:
        rejections = session.scalars(select(DicomRejection).order_by(DicomRejection.id)).all()
        actors = set(session.scalars(select(AuditEvent.actor)))
    assert [(r.status, r.peer_address, r.calling_ae) for r in rejections] == [
        (0xA900, "10.1.2.3", "STOW:reader-7"),
        (0xC000, "10.1.2.3", "STOW:reader-7"),
    ]
    assert "ae:STOW:reader-7" in actors
