"""A two-host rehearsal on one machine: "host A" runs the DICOM listener and the HTTP API,
"host B" Redis, Triton and the workers; each has its own local directory, and all they share is
the S3 URL (SeaweedFS), the broker and PostgreSQL. All three flows run end to end across them:
a worker on B reads what the listener and a submission on A stored, and A serves what B made."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from core.job_kinds import JobKind
from core.settings import Settings
from db.models import DicomStudy, EhrScore, Job, JobState
from db.session import dispose_all, session_scope
from ingest.chem.submit import submit_library
from ingest.ehr.reader import read_extract
from ingest.ehr.submit import submit_extract
from medbatch.services.dicomweb import retrieve
from medbatch.services.health import stack_status
from medbatch.services.studies import key_image_png
from medbatch.services.tokens import Scope, create_token
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.process import free_port
from medbatch.stack.s3_server import S3Server
from medbatch.stack.state import PartKind
from medbatch.stack.worker_process import use_settings
from medbatch.synth.ehr import write_long_csv
from tests.conftest import _drop_pg_database, _fresh_pg_database, make_settings
from tests.dicom_data import make_series, storescu
from tests.helpers import unique_valid, wait_for_job, wait_until, write_smi
from workers.dispatch import publish

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.postgres]


@dataclass
class Hosts:
    a: Settings  # listener + API
    b: Settings  # Redis, Triton, workers


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("two-hosts")
    database_url, db_name = _fresh_pg_database(postgres_server)
    server = S3Server(root / "seaweedfs")
    saved = dict(os.environ)
    os.environ.update(server.env())
    shared = {
        "storage_url": server.url("hospital"),
        "s3_endpoint_url": server.endpoint_url,
        "database_url": database_url,
        "dicom_destination": "",
    }
    b = make_settings(root / "host-b", **shared)
    a = make_settings(
        root / "host-a",
        **shared,
        broker_url=b.broker_url,
        triton_grpc_port=b.triton_grpc_port,
        triton_http_port=b.triton_http_port,
        triton_metrics_port=b.triton_metrics_port,
        dicom_port=free_port(),
        api_port=free_port(),
    )
    try:
        with (
            server,
            EmbeddedStack(b, workers=1, beat=False, ready_timeout_s=240),
            EmbeddedStack(a, workers=0, start_triton=False, listener=True, api=True),
        ):
            use_settings(a)  # this test process is an operator on host A
            yield Hosts(a, b)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        from core.settings import get_settings
        from workers.celery_app import app, reconfigure

        get_settings.cache_clear()
        reconfigure(app, get_settings())
        dispose_all()
        _drop_pg_database(db_name)


def _objects_on_disk(settings: Settings) -> list[Path]:
    """Files of kept objects (instances, results, extracts, buckets) on a host's own disk."""
    found = []
    for folder in ("dicom", "dicom-results", "ehr", "scratch", "uploads"):
        root = settings.storage_dir / folder
        if root.exists():
            found += [p for p in root.rglob("*") if p.is_file()]
    return found


def test_three_flows_across_two_hosts(hosts: Hosts, tmp_path: Path, nci_smiles: list) -> None:
    a, b = hosts.a, hosts.b
    # PACS push to host A; scored on host B
    paths = make_series(tmp_path / "ct", 20)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(a, paths)

    # an EHR extract and a compound library submitted on host A
    extract = tmp_path / "night.csv"
    write_long_csv(extract, 80, seed=3, messiness=0.03)
    ehr = submit_extract(extract, a, publish)
    library = write_smi(
        tmp_path / "lib.smi",
        [f"{smi}\t{name}" for smi, name, _ in unique_valid(nci_smiles, 10, skip=4000)],
    )
    screen = submit_library(library, a, publish)
    # and one more extract uploaded to host A's HTTP API
    uploaded = tmp_path / "upload.csv"
    write_long_csv(uploaded, 30, seed=4, messiness=0.0)
    token = create_token(a, "two-hosts", frozenset({Scope.SUBMIT}), actor="test")[1]
    with uploaded.open("rb") as f:
        answer = httpx.post(
            f"{a.api_url}/api/v1/ehr/extracts",
            files={"file": ("upload.csv", f, "text/csv")},
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
        )
    assert answer.status_code == 201, answer.text
    uploaded_job = int(answer.json()["id"])

    def study_job() -> int | None:
        with session_scope(a.database_url) as session:
            study = session.scalar(select(DicomStudy.id).where(DicomStudy.study_uid == study_uid))
            return session.scalar(
                select(Job.id).where(
                    Job.kind == JobKind.DICOM_STUDY.value, Job.source == f"dicom-study:{study}"
                )
            )

    wait_until(lambda: study_job() is not None, 120, "the study's scoring job")
    dicom_job = wait_for_job(a, int(study_job() or 0), timeout=300)
    assert dicom_job.state == JobState.DONE.value, dicom_job.error
    # host A serves the SR and key image host B made (read from the bucket)
    files = retrieve(a, study_uid, actor="test")
    modalities = sorted(str(pydicom.dcmread(io.BytesIO(f.data)).Modality) for f in files)
    assert len(files) == 2 and "SR" in modalities
    assert key_image_png(a, study_uid, actor="test").startswith(b"\x89PNG")

    ehr_job = wait_for_job(a, ehr.job_id, timeout=300)
    assert ehr_job.state == JobState.DONE.value, ehr_job.error
    patients = {p for block in read_extract(extract) for p in block.patient_id.to_pylist()}
    with session_scope(a.database_url) as session:
        scores = session.scalar(
            select(func.count()).select_from(EhrScore).where(EhrScore.extract_id == ehr.job_id)
        )
    assert scores == 2 * len(patients)

    assert wait_for_job(a, uploaded_job, timeout=300).state == JobState.DONE.value

    screen_job = wait_for_job(a, screen.job_id, timeout=300)
    assert screen_job.state == JobState.DONE.value, screen_job.error

    # host A's status names the shared store as a required part, answering
    (storage,) = [p for p in stack_status(a).parts if p.kind is PartKind.STORAGE]
    assert storage.ok and storage.required and storage.detail == a.storage_url

    # nothing kept lives on either host's disk: only in the shared store
    assert _objects_on_disk(a) == [] and _objects_on_disk(b) == []
