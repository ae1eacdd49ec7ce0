"""The listener against real peers: DCMTK's echoscu/storescu and pynetdicom associations, with
the real Redis, Triton and Celery worker of the session stack behind it."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from core.settings import Settings
from db.models import AuditEvent, DicomInstance, DicomRejection, DicomStudy
from db.session import session_scope
from medbatch.stack.embedded import EmbeddedStack
from tests.dicom_data import associate, dcmtk, make_series, storescu, truncate

pytestmark = pytest.mark.server


def _count(settings: Settings, model: type, *where: object) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _study_instances(settings: Settings, study_uid: str) -> int:
    return _count(
        settings,
        DicomInstance,
        DicomInstance.study_id
        == select(DicomStudy.id).where(DicomStudy.study_uid == study_uid).scalar_subquery(),
    )


def test_dcmtk_echoscu_is_answered(stack: EmbeddedStack) -> None:
    s = stack.settings
    done = subprocess.run(
        [dcmtk("echoscu"), "-aec", s.dicom_ae_title, "127.0.0.1", str(s.dicom_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_unknown_calling_ae_is_refused_and_audited(stack: EmbeddedStack) -> None:
    s = stack.settings
    before = _count(s, AuditEvent, AuditEvent.action == "dicom.association_refused")
    done = subprocess.run(
        [
            dcmtk("echoscu"),
            "-aet",
            "INTRUDER",
            "-aec",
            s.dicom_ae_title,
            "127.0.0.1",
            str(s.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Association Rejected" in done.stdout + done.stderr, done.stdout + done.stderr
    assoc = associate(s, calling_ae="NOBODY")
    assert assoc.is_rejected
    assert _count(s, AuditEvent, AuditEvent.action == "dicom.association_refused") == before + 2


def test_a_series_from_dcmtk_storescu_is_stored_durably(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    paths = make_series(tmp_path, 20)
    storescu(s, paths)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    assert _study_instances(s, study_uid) == 20
    stored = list((s.dicom_storage_dir / study_uid).rglob("*.dcm"))
    assert len(stored) == 20
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == {
        pydicom.dcmread(p).SOPInstanceUID for p in paths
    }


def test_a_resent_instance_is_stored_once(stack: EmbeddedStack, tmp_path: Path) -> None:
    s = stack.settings
    path = make_series(tmp_path, 1)[0]
    ds = pydicom.dcmread(path)
    assoc = associate(s)
    assert assoc.is_established
    try:
        first = assoc.send_c_store(ds)
        second = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert first.Status == 0x0000 and second.Status == 0x0000
    assert _count(s, DicomInstance, DicomInstance.sop_instance_uid == ds.SOPInstanceUID) == 1
    # and from DCMTK too: still one
    storescu(s, [path])
    assert _count(s, DicomInstance, DicomInstance.sop_instance_uid == ds.SOPInstanceUID) == 1


def test_a_truncated_file_is_refused_with_a_reason_and_the_next_succeeds(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    good, victim = make_series(tmp_path / "series", 2)
    broken = truncate(victim, tmp_path / "broken.dcm")
    victim_uid = str(pydicom.dcmread(victim, stop_before_pixels=True).SOPInstanceUID)
    assoc = associate(s)
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(broken)  # streamed from the file as it is, truncated
        accepted = assoc.send_c_store(pydicom.dcmread(good))
    finally:
        assoc.release()
    assert refused.Status == 0xC000
    assert "truncated" in str(refused.get("ErrorComment", ""))
    assert accepted.Status == 0x0000
    with session_scope(s.database_url) as session:
        reason = session.scalar(
            select(DicomRejection.reason).where(DicomRejection.sop_instance_uid == victim_uid)
        )
    assert reason is not None and "truncated" in reason
    assert _count(s, DicomInstance, DicomInstance.sop_instance_uid == victim_uid) == 0


def test_a_non_image_object_is_refused_and_recorded(stack: EmbeddedStack) -> None:
    s = stack.settings
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    assoc = associate(s)
    try:
        status = assoc.send_c_store(sr)
    finally:
        assoc.release()
    assert status.Status == 0xA900
    assert "not an image" in str(status.ErrorComment)
    assert _count(s, DicomRejection, DicomRejection.sop_instance_uid == sr.SOPInstanceUID) == 1


def test_four_associations_at_once(stack: EmbeddedStack, tmp_path: Path) -> None:
    s = stack.settings
    series = [make_series(tmp_path / f"s{i}", 12) for i in range(4)]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(paths: list[Path]) -> None:
        assoc = associate(s)
        assert assoc.is_established
        try:
            for p in paths:
                code = int(assoc.send_c_store(pydicom.dcmread(p)).Status)
                with lock:
                    statuses.append(code)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(paths,)) for paths in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [0] * 48
    for paths in series:
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        assert _study_instances(s, uid) == 12
