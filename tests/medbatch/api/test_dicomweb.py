"""DICOMweb against the real server, with ``dicomweb-client`` as the independent peer: a CT series
stored by STOW-RS is scored once; the study is found by QIDO-RS; the SR medbatch produced is
retrieved by WADO-RS and read back with highdicom; a study split between C-STORE and STOW-RS is
one study and one scoring job; malformed requests get clear per-part or per-request answers."""

from __future__ import annotations

import io
import time
from pathlib import Path

import highdicom as hd
import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from core.job_kinds import JobKind
from db.models import AuditEvent, DicomInstance, DicomRejection, DicomStudy, Job, JobState
from db.session import session_scope
from tests.dicom_data import CT_SMALL, make_series, storescu, truncate
from tests.helpers import wait_until
from tests.medbatch.api.conftest import UPLOAD_LIMIT, Api

pytestmark = [pytest.mark.server]


def _client(api: Api, scope: str = "submit") -> DICOMwebClient:
    return DICOMwebClient(
        f"{api.url}/dicomweb", headers={"Authorization": f"Bearer {api.tokens[scope]}"}
    )


def _datasets(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def _study_jobs(api: Api, study_uid: str) -> list[Job]:
    with session_scope(api.settings.database_url) as session:
        study_id = session.scalar(select(DicomStudy.id).where(DicomStudy.study_uid == study_uid))
        return list(
            session.scalars(
                select(Job).where(
                    Job.kind == JobKind.DICOM_STUDY.value, Job.source == f"dicom-study:{study_id}"
                )
            )
        )


def _scored(api: Api, study_uid: str) -> Job:
    def done() -> bool:
        jobs = _study_jobs(api, study_uid)
        return bool(jobs) and all(JobState(j.state).terminal for j in jobs)

    wait_until(done, 240, "the study to be completed and scored")
    (job,) = _study_jobs(api, study_uid)
    return job


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "stowtest") -> tuple[bytes, str]:
    body = b""
    for ctype, data in parts:
        body += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_a_series_stored_by_stow_is_scored_found_and_its_sr_retrieved(
    api: Api, tmp_path: Path
) -> None:
    paths = make_series(tmp_path, 20)
    datasets = _datasets(paths)
    study_uid = str(datasets[0].StudyInstanceUID)
    for ds in datasets:
        ds.AccessionNumber = "ACC-STOW-1"
        ds.StudyDate = "20261130"
    client = _client(api)
    response = client.store_instances(datasets[:10])
    assert len(response.ReferencedSOPSequence) == 10 and "FailedSOPSequence" not in response
    client.store_instances(datasets[10:], study_instance_uid=study_uid)
    job = _scored(api, study_uid)
    assert job.state == JobState.DONE.value, job.error
    assert job.item_count == 20

    reader = _client(api, "read")
    found = reader.search_for_studies(search_filters={"AccessionNumber": "ACC-STOW-*"})
    assert [f["0020000D"]["Value"][0] for f in found] == [study_uid]
    assert reader.search_for_studies(search_filters={"StudyDate": "20261101-20261201"})
    assert not reader.search_for_studies(search_filters={"StudyDate": "19990101-19991231"})
    modalities = found[0]["00080061"]["Value"]
    assert "CT" in modalities and "SR" in modalities
    series = reader.search_for_series(study_uid)
    sr_series = next(s for s in series if s["00080060"]["Value"] == ["SR"])
    sr_series_uid = sr_series["0020000E"]["Value"][0]
    (sr_item,) = reader.search_for_instances(study_uid, sr_series_uid)
    sr_uid = sr_item["00080018"]["Value"][0]

    sr = reader.retrieve_instance(study_uid, sr_series_uid, sr_uid)
    report = hd.sr.srread(io.BytesIO(_encode(sr)))
    assert report.SOPInstanceUID == sr_uid and report.StudyInstanceUID == study_uid
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    meta = reader.retrieve_instance_metadata(study_uid, sr_series_uid, sr_uid)
    assert meta["00080018"]["Value"] == [sr_uid]
    whole = reader.retrieve_study(study_uid)
    assert len(whole) == 2 and "SR" in {str(d.Modality) for d in whole}

    with session_scope(api.settings.database_url) as session:
        actions = set(
            session.scalars(select(AuditEvent.action).where(AuditEvent.actor == "token:test-read"))
        )
    assert {"dicomweb.search", "dicomweb.retrieve"} <= actions


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_study_half_by_c_store_half_by_stow_is_one_study_and_one_job(
    api: Api, tmp_path: Path
) -> None:
    paths = make_series(tmp_path, 20)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(api.settings, paths[:10])
    _client(api).store_instances(_datasets(paths[10:]))
    job = _scored(api, study_uid)
    assert job.state == JobState.DONE.value and job.item_count == 20
    with session_scope(api.settings.database_url) as session:
        (study,) = session.scalars(select(DicomStudy).where(DicomStudy.study_uid == study_uid))
        assert study.instance_count == 20 and study.version == 1
        senders = set(
            session.scalars(
                select(DicomInstance.calling_ae).where(DicomInstance.study_id == study.id)
            )
        )
    assert senders == {"STORESCU", "STOW:test-submit"}


def test_bad_stow_requests_get_clear_answers_and_store_nothing_half(
    api: Api, tmp_path: Path
) -> None:
    good = make_series(tmp_path / "good", 2)
    other = make_series(tmp_path / "other", 1)
    study_uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID)
    truncated = truncate(good[1], tmp_path / "cut.dcm").read_bytes()
    headers = {"Authorization": f"Bearer {api.tokens['submit']}"}
    url = f"{api.url}/dicomweb/studies"
    with httpx.Client(timeout=60, headers=headers) as c:
        # a part that is not DICOM, a part of the wrong type, a truncated part, one good part
        body, ctype = _multipart(
            [
                ("application/dicom", b"this is not DICOM at all"),
                ("application/json", b"{}"),
                ("application/dicom", truncated),
                ("application/dicom", good[0].read_bytes()),
            ]
        )
        answer = c.post(url, content=body, headers={"Content-Type": ctype})
        assert answer.status_code == 202, answer.text  # some stored, some failed
        doc = answer.json()
        assert len(doc["00081199"]["Value"]) == 1
        failed = doc["00081198"]["Value"]
        assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000, 0xC000]
        comments = [f["00000902"]["Value"][0] for f in failed]
        assert "cannot be decoded" in comments[0] and "application/json" in comments[1]
        assert "truncated" in comments[2].lower()

        # the same instance again: success, stored once
        body, ctype = _multipart([("application/dicom", good[0].read_bytes())])
        again = c.post(url, content=body, headers={"Content-Type": ctype})
        assert again.status_code == 200, again.text

        # an instance of another study, addressed to this one: refused (all failed: 409)
        body, ctype = _multipart([("application/dicom", other[0].read_bytes())])
        wrong = c.post(f"{url}/{study_uid}", content=body, headers={"Content-Type": ctype})
        assert wrong.status_code == 409
        assert wrong.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA901]

        # whole-request errors: no boundary, wrong type, no token, over the size limit
        no_boundary = c.post(
            url,
            content=b"x",
            headers={"Content-Type": 'multipart/related; type="application/dicom"'},
        )
        assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["detail"]
        json_type = c.post(
            url,
            content=b"x",
            headers={
                "Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b'
            },
        )
        assert json_type.status_code == 415
        body, ctype = _multipart([("application/dicom", b"\0" * (UPLOAD_LIMIT + 10))])
        assert c.post(url, content=body, headers={"Content-Type": ctype}).status_code == 413
    with httpx.Client(timeout=60) as anonymous:
        body, ctype = _multipart([("application/dicom", good[1].read_bytes())])
        assert anonymous.post(url, content=body, headers={"Content-Type": ctype}).status_code == 401

    with session_scope(api.settings.database_url) as session:
        stored = session.scalars(
            select(DicomInstance.sop_instance_uid).where(
                DicomInstance.sop_instance_uid.in_(
                    [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good]
                )
            )
        ).all()
        assert len(stored) == 1  # the good one, once; the truncated one never
        reasons = [
            r.reason
            for r in session.scalars(
                select(DicomRejection).where(DicomRejection.calling_ae == "STOW:test-submit")
            )
        ]
    assert any("another study" in r for r in reasons)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and list(api.settings.dicom_storage_dir.rglob("*.tmp*")):
        time.sleep(0.2)
    assert not list(api.settings.dicom_storage_dir.rglob("*.tmp*"))  # no half-written file


def test_qido_refuses_keys_it_cannot_match_and_wado_names_what_is_missing(api: Api) -> None:
    with httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {api.tokens['read']}"}
    ) as c:
        bad = c.get("/dicomweb/studies", params={"PatientName": "DOE*"})
        assert bad.status_code == 422 and "cannot search studies by" in bad.json()["detail"]
        assert c.get("/dicomweb/studies", params={"StudyDate": "2026-11-30"}).status_code == 422
        missing = c.get("/dicomweb/studies/1.2.3/series/4.5.6/instances/7.8.9")
        assert missing.status_code == 404
        none = c.get("/dicomweb/studies", params={"StudyInstanceUID": "1.2.3.4.5"})
        assert none.status_code == 204
    assert CT_SMALL.is_file()
