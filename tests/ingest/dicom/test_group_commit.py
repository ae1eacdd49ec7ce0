"""The group committer: a batch of rows from instances in flight is one transaction, and every
item still gets its own outcome (duplicates, refusals, a failed file or a bad row fail alone)."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from core.settings import Settings
from db.audit import verify_chain
from db.models import AuditEvent, DicomInstance, DicomRejection, DicomStudy
from db.session import session_scope
from ingest.dicom.registry import Duplicate, GroupCommitter, NewInstance, Refusal, Ticket
from ingest.dicom.store import InstanceStore, Sender
from ingest.dicom.validate import ReceivedInstance
from tests.dicom_data import make_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def _new(study: str, sop: str, *, modality: str | None = "CT") -> NewInstance:
    inst = ReceivedInstance(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=sop,
        sop_class_uid=CT,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,  # type: ignore[arg-type]  # None: a row the database refuses
        patient_digest="sha256:" + "0" * 32,
    )
    return NewInstance(inst, f"{study}/{sop}.dcm", 10, "a" * 64, "CT1")


def _count(url: str, model: type, *where: object) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _ticket(item: NewInstance | Duplicate | Refusal, directory: Path | None = None) -> Ticket:
    t = Ticket(item, directory)
    if directory is not None:
        t.file_synced()
    return t


def test_one_batch_gives_each_item_its_outcome(tmp_path: Path, db_url: str) -> None:
    committer = GroupCommitter(db_url)
    try:
        failed_file = Ticket(_new("1.2.3", "1.2.3.9"), tmp_path)
        failed_file.file_synced(OSError("disk full"))
        batch = [
            _ticket(_new("1.2.3", "1.2.3.1"), tmp_path),
            _ticket(_new("1.2.3", "1.2.3.1"), tmp_path),  # the same instance on another assoc
            _ticket(_new("1.2.4", "1.2.4.1"), tmp_path),
            failed_file,
            _ticket(Refusal("CT1", "10.0.0.1", CT, "1.2.3.7", 0xC000, "truncated")),
        ]
        committer._commit_batch(batch)
        first, second, other = (t.wait(10) for t in batch[:3])
        refused = batch[4].wait(10)
        with pytest.raises(OSError, match="disk full"):
            failed_file.wait(10)
        assert first.inserted and not second.inserted and first.study_id == second.study_id
        assert other.inserted and other.study_id != first.study_id
        assert refused.study_id is None and not refused.inserted
        # a resend after the commit: a duplicate, answered with the stored study
        (dup,) = [_ticket(Duplicate("1.2.3.1", "b" * 64, "CT1"))]
        committer._commit_batch([dup])
        assert dup.wait(10).study_id == first.study_id
    finally:
        committer.close()
    assert _count(db_url, DicomInstance) == 2
    assert _count(db_url, DicomRejection, DicomRejection.reason == "truncated") == 1
    assert _count(db_url, AuditEvent, AuditEvent.action == "dicom.stored") == 2
    assert _count(db_url, AuditEvent, AuditEvent.action == "dicom.duplicate") == 2
    with session_scope(db_url) as session:
        counts = dict(
            session.execute(select(DicomStudy.study_uid, DicomStudy.instance_count)).all()
        )
        assert verify_chain(session).ok
    assert counts == {"1.2.3": 1, "1.2.4": 1}


def test_a_row_the_database_refuses_fails_alone(tmp_path: Path, db_url: str) -> None:
    committer = GroupCommitter(db_url)
    try:
        good, bad, also_good = (
            _ticket(_new("1.2.5", "1.2.5.1"), tmp_path),
            _ticket(_new("1.2.5", "1.2.5.2", modality=None), tmp_path),  # NOT NULL
            _ticket(_new("1.2.6", "1.2.6.1"), tmp_path),
        )
        committer._commit_batch([good, bad, also_good])
        assert good.wait(10).inserted and also_good.wait(10).inserted
        with pytest.raises(Exception, match=r"(?i)null"):
            bad.wait(10)
    finally:
        committer.close()
    assert _count(db_url, DicomInstance) == 2
    with session_scope(db_url) as session:
        assert verify_chain(session).ok


def test_concurrent_senders_share_commits_and_lose_nothing(tmp_path: Path, db_url: str) -> None:
    settings = Settings(storage_dir=tmp_path, database_url=db_url)  # type: ignore[call-arg]
    series = [make_series(tmp_path / f"in{i}", 6) for i in range(4)]
    store = InstanceStore(settings)
    batches: list[int] = []
    real = store.committer._transaction

    def counted(items: list[object]) -> object:
        batches.append(len(items))
        return real(items)  # type: ignore[arg-type]

    store.committer._transaction = counted  # type: ignore[method-assign, assignment]
    results: list[bool] = []
    lock = threading.Lock()

    def send(paths: list[Path]) -> None:
        for p in paths:
            r = store.store(p.read_bytes(), Sender("CT1", "10.0.0.1"), sop_class_uid=CT)
            with lock:
                results.append(r.ok and r.stored)

    threads = [threading.Thread(target=send, args=(s,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    store.close()
    assert results == [True] * 24
    assert sum(batches) == 24
    assert _count(db_url, DicomInstance) == 24
    for paths in series:
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        assert _count(db_url, DicomStudy, DicomStudy.study_uid == uid) == 1
    assert len(list(settings.dicom_storage_dir.rglob("*.dcm"))) == 24
    assert not list(settings.dicom_storage_dir.rglob("*.tmp"))
    with session_scope(db_url) as session:
        assert verify_chain(session).ok
