"""Faults around the listener: storage that fails answers a failure status (the sender retries),
and a listener killed mid-study loses nothing it answered Success for."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from core.job_kinds import JobKind
from core.settings import Settings
from db.migrate import upgrade
from db.models import DicomInstance, DicomRejection, DicomStudy, Job
from db.session import session_scope
from ingest.dicom.listener import Listener
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.process import free_port
from tests.dicom_data import associate, make_series
from tests.helpers import wait_for_job
from workers.sweeper import sweep

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def local_listener(tmp_path: Path) -> Iterator[Listener]:
    settings = Settings(  # type: ignore[call-arg]
        storage_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'l.db'}",
        dicom_port=free_port(),
        dicom_allowed_aes="MEDBATCH_TEST",
    )
    upgrade(settings.database_url)
    listener = Listener(settings, lambda job_id, kind: None)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def test_a_storage_failure_answers_out_of_resources_and_a_resend_then_succeeds(
    local_listener: Listener, tmp_path: Path
) -> None:
    s = local_listener.settings
    ds = pydicom.dcmread(make_series(tmp_path / "in", 1)[0])
    blocker = s.dicom_storage_dir / str(ds.StudyInstanceUID)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the study directory should be")  # mkdir will fail

    ae = AE(ae_title="MEDBATCH_TEST")
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", local_listener.port, ae_title=s.dicom_ae_title)
    assert assoc.is_established
    try:
        failed = assoc.send_c_store(ds)
        blocker.unlink()  # the operator frees the storage
        retried = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert failed.Status == 0xA700 and "retry" in str(failed.ErrorComment)
    assert retried.Status == 0x0000
    with session_scope(s.database_url) as session:
        assert session.scalar(select(func.count()).select_from(DicomInstance)) == 1
        reason = session.scalar(select(DicomRejection.reason))
    assert reason is not None and "could not store" in reason


@pytest.mark.server
@pytest.mark.slow
def test_a_listener_killed_mid_study_loses_nothing_it_acknowledged(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    paths = make_series(tmp_path, 30)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    acknowledged = 0
    assoc = associate(s)
    assert assoc.is_established
    for p in paths:
        if acknowledged == 18:
            assert stack.listener is not None
            stack.listener.kill()  # SIGKILL in the middle of the association
        try:
            status = assoc.send_c_store(pydicom.dcmread(p))
        except Exception:
            break
        if not status or status.get("Status") != 0x0000:
            break
        acknowledged += 1
    assoc.abort()
    assert acknowledged == 18

    with session_scope(s.database_url) as session:
        study = session.scalars(select(DicomStudy).where(DicomStudy.study_uid == study_uid)).one()
        stored = session.scalar(select(func.count()).where(DicomInstance.study_id == study.id))
    assert stored == 18 and study.open
    for path in (s.dicom_storage_dir / study_uid).rglob("*.dcm"):
        pydicom.dcmread(path).pixel_array  # every stored file is complete  # noqa: B018

    def jobs() -> list[Job]:
        with session_scope(s.database_url) as session:
            return list(
                session.scalars(
                    select(Job).where(
                        Job.kind == JobKind.DICOM_STUDY.value,
                        Job.source == f"dicom-study:{study.id}",
                    )
                )
            )

    # With no listener running, the sweeper (beat) closes the quiet study ...
    time.sleep(s.dicom_quiet_period_s + 0.5)
    swept = sweep(s)
    (job,) = jobs()
    assert job.id in swept.studies_closed and job.item_count == 18
    # ... and the restarted listener does not close it a second time.
    stack.start_listener()
    time.sleep(s.dicom_quiet_period_s + 2 * s.dicom_completion_poll_s)
    assert [j.id for j in jobs()] == [job.id]
    assert wait_for_job(s, job.id, timeout=240).state in ("done", "not_applicable")
