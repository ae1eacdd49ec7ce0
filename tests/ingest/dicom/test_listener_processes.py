"""Several listener processes on one port (SO_REUSEPORT): associations spread over them, the study
completes exactly once, and helpers do not outlive a primary that is SIGKILLed alone."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from core.job_kinds import JobKind
from db.models import AuditEvent, DicomStudy, Job
from db.session import session_scope
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.process import port_open
from tests.conftest import make_settings
from tests.dicom_data import associate, make_series
from tests.helpers import wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def two_process_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    settings = make_settings(
        tmp_path,
        dicom_listener_processes=2,
        dicom_quiet_period_s=2.0,
        dicom_max_associations=32,  # 16 at once, + the stack's readiness probe (a bare connect)
    )
    with EmbeddedStack(settings, workers=0, beat=False, start_triton=False, listener=True) as stack:
        yield stack


def test_associations_spread_over_processes_and_the_study_completes_once(
    two_process_stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = two_process_stack.settings
    paths = make_series(tmp_path / "in", 32)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    statuses: list[int] = []
    lock = threading.Lock()

    def send(part: list[Path]) -> None:
        assoc = associate(s)
        assert assoc.is_established
        try:
            for p in part:
                code = int(assoc.send_c_store(pydicom.dcmread(p)).Status)
                with lock:
                    statuses.append(code)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(paths[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [0] * 32

    with session_scope(s.database_url) as session:
        pids = {
            e.details["listener_pid"]
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.action == "dicom.association")
            )
        }
        study = session.scalars(select(DicomStudy).where(DicomStudy.study_uid == study_uid)).one()
    assert len(pids) == 2, pids  # 16 associations, 2 processes: both took some
    assert study.instance_count == 32

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

    wait_until(lambda: len(jobs()) > 0, 30, "the study to complete")
    time.sleep(4 * s.dicom_completion_poll_s)  # more polls: still one job for this version
    (job,) = jobs()
    assert job.item_count == 32


def test_helpers_exit_when_the_primary_is_killed_alone(
    two_process_stack: EmbeddedStack,
) -> None:
    s = two_process_stack.settings
    assert two_process_stack.listener is not None
    primary = two_process_stack.listener.pid
    helpers = [p for p in _children(primary) if _alive(p)]
    assert len(helpers) == 1, helpers
    os.kill(primary, signal.SIGKILL)
    wait_until(lambda: not any(_alive(p) for p in helpers), 15, "the helper to exit")
    wait_until(lambda: not port_open("127.0.0.1", s.dicom_port), 15, "the port to close")
