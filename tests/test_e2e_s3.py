"""The three flows end to end with ``MEDBATCH_STORAGE_URL=s3://…`` against a real SeaweedFS on
loopback (``medbatch/stack/s3_server.py``), and the object store's faults: stopped during a
C-STORE (0xA700, nothing registered), during a worker's read and during an EHR spill (the job
backs off, fails saying so, and ``medbatch retry`` resumes it once the store is back)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from core.job_kinds import JobKind
from core.settings import Settings
from core.storage import storage_for
from db.models import (
    DicomInstance,
    DicomRejection,
    DicomResult,
    DicomStudy,
    EhrScore,
    Job,
    JobState,
)
from db.session import session_scope
from ingest.dicom.validate import STATUS_OUT_OF_RESOURCES
from ingest.ehr.reader import read_extract
from ingest.ehr.submit import submit_extract
from medbatch.cli import app
from medbatch.stack import probes
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.s3_server import S3Server
from medbatch.synth.ehr import write_long_csv
from tests.conftest import make_settings, private_stack
from tests.dicom_data import associate, make_series, pacs_receiver, storescu
from tests.helpers import unique_valid, wait_for_job, wait_until, write_smi
from workers.dispatch import publish

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def s3_stack(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """Redis + Triton + a worker + the listener, keeping everything in the bucket; back-off
    short enough that a fault test sees the job fail within seconds."""
    settings = make_settings(
        tmp_path_factory.mktemp("s3-stack"),
        storage_url=s3_server.url("site-a"),
        s3_endpoint_url=s3_server.endpoint_url,
        s3_timeout_s=5.0,
        dicom_listener_processes=2,  # the helper process stores through the bucket too
        triton_retry_base_s=0.5,
        triton_retry_max_s=1.0,
        triton_max_retries=3,
    )
    with private_stack(settings, workers=1, beat=False, listener=True) as running:
        yield running


@pytest.fixture(scope="module")
def receiver(s3_stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """DCMTK's storescp as the PACS results go back to (read from the bucket by the sender)."""
    with pacs_receiver(s3_stack.settings, tmp_path_factory.mktemp("pacs")) as out_dir:
        yield out_dir


def _local_files(settings: Settings, folder: str) -> list[Path]:
    root = settings.storage_dir / folder
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _study_job(settings: Settings, study_uid: str) -> Job:
    def find() -> int | None:
        with session_scope(settings.database_url) as session:
            study = session.scalar(select(DicomStudy.id).where(DicomStudy.study_uid == study_uid))
            return session.scalar(
                select(Job.id).where(
                    Job.kind == JobKind.DICOM_STUDY.value, Job.source == f"dicom-study:{study}"
                )
            )

    wait_until(lambda: find() is not None, 90, "the study's scoring job")
    return wait_for_job(settings, int(find() or 0), timeout=240)


def test_a_pushed_study_is_stored_in_the_bucket_scored_and_sent_back(
    s3_stack: EmbeddedStack, receiver: Path, tmp_path: Path
) -> None:
    s = s3_stack.settings
    storage = storage_for(s)
    paths = make_series(tmp_path, 20)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(s, paths)
    # acknowledged means in the bucket, not on this host's disk
    assert len(storage.keys(f"dicom/{study_uid}")) == 20
    assert not _local_files(s, "dicom")

    job = _study_job(s, study_uid)
    assert job.state == JobState.DONE.value, job.error
    with session_scope(s.database_url) as session:
        (result,) = session.scalars(select(DicomResult).where(DicomResult.job_id == job.id))
        sr_key, sc_key = result.sr_path, result.sc_path
    assert sr_key and sc_key
    sr = pydicom.dcmread(io.BytesIO(storage.get(sr_key)))
    assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR"
    assert storage.exists(sc_key)
    assert not _local_files(s, "dicom-results")  # results live in the bucket only

    def sent() -> int:
        return sum(
            1 for p in receiver.iterdir() if pydicom.dcmread(p).StudyInstanceUID == study_uid
        )

    wait_until(lambda: sent() == 2, 120, "SR and key image at the PACS")
    # the send job read them from the bucket into its scratch folder, which goes with it
    wait_until(lambda: not _local_files(s, "scratch"), 30, "the tasks' scratch to go")


def _patients(path: Path) -> set[str]:
    return {pid for block in read_extract(path) for pid in block.patient_id.to_pylist()}


def _extract_id(settings: Settings, name: str) -> int:
    with session_scope(settings.database_url) as session:
        found = session.scalar(
            select(Job.id)
            .where(Job.kind == JobKind.EHR_EXTRACT.value, Job.source == name)
            .order_by(Job.id.desc())
        )
    assert found is not None
    return int(found)


def _score_count(settings: Settings, extract_id: int) -> int:
    with session_scope(settings.database_url) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(EhrScore).where(EhrScore.extract_id == extract_id)
            )
            or 0
        )


def test_an_extract_goes_through_the_bucket_and_is_scored(
    s3_stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = s3_stack.settings
    path = tmp_path / "night.csv"
    write_long_csv(path, 120, seed=5, messiness=0.05)
    result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    extract_id = _extract_id(s, path.name)
    job = wait_for_job(s, extract_id, timeout=300)
    assert job.state == JobState.DONE.value, job.error
    assert _score_count(s, extract_id) == 2 * len(_patients(path))  # both EHR models
    storage = storage_for(s)
    key = job.params["object"]
    assert key.startswith("uploads/") and storage.get(key) == path.read_bytes()
    with session_scope(s.database_url) as session:
        spools = [
            j.params["spool_file"]
            for j in session.scalars(select(Job).where(Job.parent_id == extract_id))
            if j.kind == JobKind.EHR_BATCH.value
        ]
    # hash buckets, and early ones (the file is grouped by patient: ingest/ehr/release.py)
    assert spools and all(
        k.startswith((f"ehr/extract-{extract_id}/", f"ehr/extract-{extract_id}-early/"))
        for k in spools
    )
    assert storage.keys(f"ehr/extract-{extract_id}") == []  # scored buckets are removed
    assert storage.keys(f"ehr/extract-{extract_id}-early") == []
    assert not _local_files(s, "ehr")


def test_a_library_is_screened_with_s3_storage(
    s3_stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    valid = unique_valid(nci_smiles, 12, skip=3000)
    library = write_smi(tmp_path / "lib.smi", [f"{smi}\t{name}" for smi, name, _ in valid])
    result = CliRunner().invoke(app, ["screen", str(library), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    assert "12" in result.output


# --- faults ------------------------------------------------------------------------------------


def test_store_down_during_c_store_answers_a700_and_registers_nothing(
    s3_stack: EmbeddedStack, s3_server: S3Server, tmp_path: Path
) -> None:
    s = s3_stack.settings
    (path,) = make_series(tmp_path, 1)
    ds = pydicom.dcmread(path)
    s3_server.stop()
    try:
        down = probes.storage(s)  # what `medbatch status` and /readyz report meanwhile
        assert not down.ok and "did not answer" in down.detail
        assoc = associate(s)
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
    finally:
        s3_server.start()
    assert status.Status == STATUS_OUT_OF_RESOURCES
    uid = str(ds.SOPInstanceUID)
    with session_scope(s.database_url) as session:
        assert (
            session.scalar(select(DicomInstance).where(DicomInstance.sop_instance_uid == uid))
            is None
        )
        refusal = session.scalar(
            select(DicomRejection).where(DicomRejection.sop_instance_uid == uid)
        )
        assert refusal is not None and "retry" in refusal.reason
    # the sender's retry, once the store is back, is stored
    assoc = associate(s)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert storage_for(s).exists(
        f"dicom/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    )


def _batch_jobs(settings: Settings, extract_id: int) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Job).where(Job.parent_id == extract_id, Job.kind == JobKind.EHR_BATCH.value)
            )
        )


def test_store_down_during_a_workers_read_fails_clearly_and_retry_resumes(
    s3_stack: EmbeddedStack, s3_server: S3Server, tmp_path: Path
) -> None:
    s = s3_stack.settings
    path = tmp_path / "read-fault.csv"
    write_long_csv(path, 40, seed=9, messiness=0.0)
    held: list[tuple[int, str]] = []
    submitted = submit_extract(path, s, lambda i, k: held.append((i, k)))  # stored, not sent
    s3_server.stop()
    try:
        for job_id, kind in held:
            publish(job_id, kind)
        extract = wait_for_job(s, submitted.job_id, timeout=120)
    finally:
        s3_server.start()
    assert extract.state == JobState.FAILED.value
    ingest = wait_for_job(s, int(submitted.ingest_id or 0), timeout=10)
    assert ingest.state == JobState.FAILED.value
    assert "object storage" in (ingest.error or "") and "medbatch retry" in (ingest.error or "")
    assert _batch_jobs(s, submitted.job_id) == []

    result = CliRunner().invoke(app, ["retry", str(submitted.job_id)])
    assert result.exit_code == 0, result.output
    done = wait_for_job(s, submitted.job_id, timeout=300)
    assert done.state == JobState.DONE.value, done.error
    assert _score_count(s, submitted.job_id) == 2 * len(_patients(path))


def test_store_down_during_an_ehr_spill_stores_no_half_extract(
    s3_stack: EmbeddedStack, s3_server: S3Server, tmp_path: Path
) -> None:
    """The extract is registered where the worker reads it from this host's disk (submitted
    without shared storage), so the store is first needed for the buckets the spill writes."""
    s = s3_stack.settings
    path = tmp_path / "spill-fault.csv"
    write_long_csv(path, 60, seed=11, messiness=0.0)
    held: list[tuple[int, str]] = []
    local = s.model_copy(update={"storage_url": ""})
    submitted = submit_extract(path, local, lambda i, k: held.append((i, k)))
    s3_server.stop()
    try:
        for job_id, kind in held:
            publish(job_id, kind)
        extract = wait_for_job(s, submitted.job_id, timeout=120)
    finally:
        s3_server.start()
    ingest = wait_for_job(s, int(submitted.ingest_id or 0), timeout=10)
    assert extract.state == JobState.FAILED.value
    assert "object storage" in (ingest.error or "") and "medbatch retry" in (ingest.error or "")
    assert _batch_jobs(s, submitted.job_id) == []  # no bucket job names a partial spill

    result = CliRunner().invoke(app, ["retry", str(submitted.job_id)])
    assert result.exit_code == 0, result.output
    done = wait_for_job(s, submitted.job_id, timeout=300)
    assert done.state == JobState.DONE.value, done.error
    batches = _batch_jobs(s, submitted.job_id)
    assert len(batches) == done.summary["buckets"]
    assert sum(b.item_count for b in batches) == done.summary["accepted_rows"]
    assert _score_count(s, submitted.job_id) == 2 * len(_patients(path))
