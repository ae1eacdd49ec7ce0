"""A pushed study is scored exactly once after the quiet period, and the result goes back to a
real storescp as DICOM; late instances make a new version; other studies end not_applicable."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from core.job_kinds import JobKind
from core.settings import Settings
from db.models import DicomInstance, DicomResult, DicomStudy, Job, JobState
from db.session import session_scope
from medbatch.stack.embedded import EmbeddedStack
from tests.dicom_data import CT_SMALL, MR_SMALL, dcmtk, make_series, pacs_receiver, storescu
from tests.helpers import wait_for_job, wait_until

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def receiver(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """DCMTK's storescp as the PACS that results are sent back to."""
    with pacs_receiver(stack.settings, tmp_path_factory.mktemp("pacs")) as out_dir:
        yield out_dir


def _study_jobs(settings: Settings, study_uid: str, kind: JobKind) -> list[Job]:
    with session_scope(settings.database_url) as session:
        study_id = session.scalar(select(DicomStudy.id).where(DicomStudy.study_uid == study_uid))
        if study_id is None:
            return []
        source = f"dicom-study:{study_id}"
        return list(
            session.scalars(
                select(Job).where(Job.kind == kind.value, Job.source == source).order_by(Job.id)
            )
        )


def _wait_for_versions(settings: Settings, study_uid: str, n: int) -> list[Job]:
    wait_until(
        lambda: len(_study_jobs(settings, study_uid, JobKind.DICOM_STUDY)) >= n,
        60,
        f"{n} scoring job(s) for the study",
    )
    jobs = _study_jobs(settings, study_uid, JobKind.DICOM_STUDY)
    return [wait_for_job(settings, j.id, timeout=240) for j in jobs]


def _received(receiver: Path, study_uid: str) -> list[pydicom.Dataset]:
    found = []
    for p in receiver.iterdir():
        ds = pydicom.dcmread(p)
        if ds.StudyInstanceUID == study_uid:
            found.append(ds)
    return found


def test_a_study_is_scored_once_and_the_sr_reaches_the_pacs(
    stack: EmbeddedStack, receiver: Path, tmp_path: Path
) -> None:
    s = stack.settings
    paths = make_series(tmp_path, 24)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(s, paths[:12])
    storescu(s, paths[12:])  # a second association within the quiet period: same version
    (job,) = _wait_for_versions(s, study_uid, 1)
    assert job.state == JobState.DONE.value, job.error
    assert job.params["version"] == 1 and job.item_count == 24

    with session_scope(s.database_url) as session:
        (result,) = session.scalars(select(DicomResult).where(DicomResult.job_id == job.id)).all()
        assert 0.0 <= result.study_probability <= 1.0
        assert len(result.slice_scores) == 24
        assert result.instance_count == 24

    wait_until(lambda: len(_received(receiver, study_uid)) == 2, 120, "SR and key image at PACS")
    objects = {str(ds.Modality): ds for ds in _received(receiver, study_uid)}
    sr = objects["SR"]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == study_uid
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
    }
    key = objects["OT"] if "OT" in objects else next(o for m, o in objects.items() if m != "SR")
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == result.most_suspicious_sop_uid
    for path in receiver.iterdir():
        dump = subprocess.run([dcmtk("dcmdump"), str(path)], capture_output=True, text=True)
        assert dump.returncode == 0 and "error" not in dump.stderr.lower()

    # a late instance re-opens the study: a new, complete version; version 1 is untouched
    late = make_series(
        tmp_path / "late",
        1,
        study_uid=study_uid,
        series_uid=str(pydicom.dcmread(paths[0]).SeriesInstanceUID),
        first_z=-100.0 + 2.5 * 24,  # the next slice up
    )
    storescu(s, late)
    first, second = _wait_for_versions(s, study_uid, 2)
    assert first.id == job.id and first.state == JobState.DONE.value
    assert second.state == JobState.DONE.value and second.params["version"] == 2
    assert second.item_count == 25
    with session_scope(s.database_url) as session:
        versions = sorted(
            (r.version, len(r.slice_scores))
            for r in session.scalars(
                select(DicomResult).where(DicomResult.study_id == result.study_id)
            )
        )
    assert versions == [(1, 24), (2, 25)]


def test_a_jpeg2000_compressed_ct_series_is_decoded_and_scored(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    paths = make_series(tmp_path, 20, transfer_syntax=JPEG2000Lossless)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(s, paths, options=("-xv",))  # propose JPEG 2000 lossless
    with session_scope(s.database_url) as session:
        syntaxes = set(
            session.scalars(
                select(DicomInstance.transfer_syntax_uid)
                .join(DicomStudy)
                .where(DicomStudy.study_uid == study_uid)
            )
        )
    assert syntaxes == {JPEG2000Lossless}  # stored as sent, decoded by pylibjpeg when scored
    (job,) = _wait_for_versions(s, study_uid, 1)
    assert job.state == JobState.DONE.value, job.error


@pytest.mark.parametrize(
    ("source", "n", "reason"),
    [(MR_SMALL, 20, "no axial single-frame CT"), (None, 5, "needs at least")],
)
def test_studies_the_model_cannot_read_are_not_applicable(
    stack: EmbeddedStack, tmp_path: Path, source: Path | None, n: int, reason: str
) -> None:
    s = stack.settings
    paths = make_series(tmp_path, n, **({"source": source} if source else {}))
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(s, paths)
    (job,) = _wait_for_versions(s, study_uid, 1)
    assert job.state == JobState.NOT_APPLICABLE.value
    assert reason in (job.error or "")


def test_no_patient_identifier_reaches_any_log(stack: EmbeddedStack) -> None:
    """After the studies above went through listener, workers and Triton, no log names a patient
    (the tests' Patient ID, or the name pydicom's CT test file carries)."""
    logs = [p for p in stack.state_dir.rglob("*.log") if p.is_file()]
    assert any(p.name == "listener.log" for p in logs)
    identifiers = ("TEST-PATIENT-0001", str(pydicom.dcmread(CT_SMALL).PatientName))
    for path in logs:
        text = path.read_text(errors="replace")
        for identifier in identifiers:
            assert identifier not in text, f"{identifier!r} appears in {path}"
