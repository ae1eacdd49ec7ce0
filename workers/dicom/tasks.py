"""Score one version of a received study with ``lung_ct_cnn`` and turn the answer into DICOM.

Flow: the study's instances up to this version → the best axial CT series → HU volume → model
grid → one Triton request → per-slice scores mapped back onto the acquired slices → a
Structured Report and a key-slice image in the source study → one commit (result row, job done,
and a send job when a destination AE is configured). A study the model cannot read ends
``not_applicable`` with the reason. A redelivered message finds the job done and stores nothing.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from celery import Task
from sqlalchemy import select

from core.errors import (
    DicomDestinationUnavailableError,
    DicomSendError,
)
from core.job_kinds import JobKind
from core.model_registry import served_model
from core.settings import Settings
from core.storage import Storage, scratch, storage_for
from db import audit
from db.insert_ignore import insert_ignore
from db.jobs import transition
from db.models import DicomInstance, DicomOutput, DicomResult, Job, JobState, utcnow
from db.session import session_scope
from workers.dicom.outputs import (
    LungCtResult,
    build_key_slice_image,
    build_structured_report,
    most_suspicious_index,
)
from workers.dicom.preprocess import model_input, source_slice_scores
from workers.dicom.sendback import (
    DICOMWEB,
    Destination,
    WebDestination,
    send_dicomweb,
    send_files,
)
from workers.dicom.series import (
    NotApplicable,
    choose_series,
    in_plane_volume,
    read_headers,
    slice_hu,
)
from workers.lifecycle import Claim, claim, close, infer_or_wait, job_task, wait_or_fail
from workers.metrics import ITEMS

log = logging.getLogger(__name__)

#: Series numbers of our objects in the source study (high, to stay clear of the modality's).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


def _instance_paths(
    settings: Settings, storage: Storage, study_id: int, version: int, tmp: Path
) -> list[Path]:
    """Local files of the study's instances up to ``version``: storage's own files, or copies
    fetched into this task's scratch folder ``tmp`` from a shared store."""
    with session_scope(settings.database_url) as session:
        rel = session.scalars(
            select(DicomInstance.path)
            .where(DicomInstance.study_id == study_id, DicomInstance.batch <= version)
            .order_by(DicomInstance.id)
        ).all()
    return storage.fetch_many([f"dicom/{p}" for p in rel], tmp)


def results_key(study_id: int, version: int) -> str:
    """The storage key (folder) of a study version's SR and key image."""
    return f"dicom-results/study-{study_id}/v{version}"


@job_task(JobKind.DICOM_STUDY)
def score_study(self: Task, job_id: int, settings: Settings) -> str:
    job = claim(self, job_id, settings)
    if isinstance(job, str):
        return job
    model = str(job.params.get("model_name", settings.dicom_model_name))
    model_version = str(job.params.get("model_version", settings.dicom_model_version))

    storage = storage_for(settings)
    with scratch(settings) as tmp:
        return _score(self, job, settings, storage, tmp, model, model_version)


def _score(
    self: Task,
    job: Claim,
    settings: Settings,
    storage: Storage,
    tmp: Path,
    model: str,
    model_version: str,
) -> str:
    study_id, version = int(job.params["study_id"]), int(job.params["version"])
    headers = read_headers(_instance_paths(settings, storage, study_id, version, tmp))
    chosen = choose_series(headers, settings.dicom_min_slices)
    if isinstance(chosen, NotApplicable):
        close(job, JobState.NOT_APPLICABLE, settings, error=chosen.reason)
        return "not-applicable"

    volume = model_input(in_plane_volume(chosen))[np.newaxis]
    outputs = list(served_model(model, settings).outputs)
    out = infer_or_wait(self, job, settings, model, model_version, {"VOLUME": volume}, outputs)
    if isinstance(out, str):
        return out
    probability = float(out["STUDY_PROB"].reshape(-1)[0])
    scores = source_slice_scores(out["SLICE_SCORES"].reshape(-1), len(chosen.slices))
    result = LungCtResult(
        study_probability=probability,
        slice_scores=tuple(float(s) for s in scores),
        model_name=model,
        model_version=model_version,
        result_version=version,
    )
    slice_headers = [s.header for s in chosen.slices]
    top = most_suspicious_index(result)
    sr = build_structured_report(slice_headers, result, series_number=SR_SERIES_NUMBER)
    sc = build_key_slice_image(
        slice_headers, slice_hu(chosen.slices[top].path), result, series_number=SC_SERIES_NUMBER
    )
    out_dir = results_key(study_id, version)
    produced: list[Produced] = []
    for name, ds in (("sr.dcm", sr), ("sc.dcm", sc)):
        encoded = _encode(ds)
        storage.put(f"{out_dir}/{name}", encoded)
        produced.append(Produced(f"{out_dir}/{name}", ds, len(encoded)))

    return _store_result(
        job, settings, chosen.series_uid, result, slice_headers, top, out_dir, produced
    )


@dataclass(frozen=True)
class Produced:
    """A DICOM object written for a result (registered for DICOMweb search and retrieval)."""

    key: str  # in storage
    dataset: pydicom.Dataset
    size_bytes: int


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _store_result(
    job: Claim,
    settings: Settings,
    series_uid: str,
    result: LungCtResult,
    slice_headers: list[pydicom.Dataset],
    top: int,
    out_dir: str,
    produced: list[Produced],
) -> str:
    study_id, version = int(job.params["study_id"]), int(job.params["version"])
    actor = audit.current_actor("worker")
    send_job: int | None = None
    with session_scope(settings.database_url) as session:
        insert_ignore(
            session,
            DicomResult,
            [
                {
                    "study_id": study_id,
                    "version": version,
                    "job_id": job.job_id,
                    "series_uid": series_uid,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "study_probability": result.study_probability,
                    "slice_scores": {
                        str(h.SOPInstanceUID): round(s, 6)
                        for h, s in zip(slice_headers, result.slice_scores, strict=True)
                    },
                    "most_suspicious_sop_uid": str(slice_headers[top].SOPInstanceUID),
                    "instance_count": len(slice_headers),
                    "sr_path": f"{out_dir}/sr.dcm",
                    "sc_path": f"{out_dir}/sc.dcm",
                    "created_at": utcnow(),
                }
            ],
            ("study_id", "version", "model_name"),
        )
        result_id = session.scalar(
            select(DicomResult.id).where(
                DicomResult.study_id == study_id,
                DicomResult.version == version,
                DicomResult.model_name == result.model_name,
            )
        )
        insert_ignore(
            session,
            DicomOutput,
            [
                {
                    "study_id": study_id,
                    "result_id": result_id,
                    "series_uid": str(p.dataset.SeriesInstanceUID),
                    "sop_instance_uid": str(p.dataset.SOPInstanceUID),
                    "sop_class_uid": str(p.dataset.SOPClassUID),
                    "modality": str(p.dataset.Modality),
                    "series_number": int(p.dataset.SeriesNumber),
                    "path": p.key,
                    "size_bytes": p.size_bytes,
                    "created_at": utcnow(),
                }
                for p in produced
            ],
            ("sop_instance_uid",),
        )
        transition(
            session,
            job.job_id,
            JobState.DONE,
            actor=actor,
            summary={
                "study_probability": round(result.study_probability, 4),
                "slices": len(slice_headers),
                "result_id": result_id,
                "result_version": version,
            },
            details={"action": "dicom.result", "result_id": result_id},
        )
        destination = (
            DICOMWEB + settings.dicomweb_destination
            if settings.dicomweb_destination
            else settings.dicom_destination
        )
        if destination:
            sender = Job(
                kind=JobKind.DICOM_SEND.value,
                parent_id=None,
                source=f"dicom-result:{result_id}",
                idempotency_key=f"dicom-send:{result_id}:{destination}"[:128],
                params={"result_id": result_id, "destination": destination},
                item_count=2,
            )
            session.add(sender)
            session.flush()
            transition(session, sender.id, JobState.QUEUED, actor=actor)
            send_job = sender.id
    ITEMS.labels(JobKind.DICOM_STUDY.value).inc(len(slice_headers))
    log.info("study %s v%s scored: p=%.3f", study_id, version, result.study_probability)
    if send_job is not None:
        from workers.dispatch import publish

        publish(send_job, JobKind.DICOM_SEND.value)  # if this fails, the sweeper re-sends
    return "done"


@job_task(JobKind.DICOM_SEND)
def send_result(self: Task, job_id: int, settings: Settings) -> str:
    """Send a result's SR and key image to the destination (C-STORE to an AE, or STOW-RS to
    a DICOMweb service); waits while it is down."""
    job = claim(self, job_id, settings)
    if isinstance(job, str):
        return job
    with session_scope(settings.database_url) as session:
        row = session.get(DicomResult, int(job.params["result_id"]))
        keys = [p for p in (row.sr_path, row.sc_path) if p] if row else []
    with scratch(settings) as tmp:
        paths = storage_for(settings).fetch_many(keys, tmp)
        return _send(self, job, settings, paths)


def _send(self: Task, job: Claim, settings: Settings, paths: list[Path]) -> str:
    target = str(job.params["destination"])
    try:
        if target.startswith(DICOMWEB):
            name, setting = target.removeprefix(DICOMWEB), "MEDBATCH_DICOMWEB_DESTINATION"
            send_dicomweb(
                WebDestination(
                    name,
                    token=settings.dicomweb_destination_token,
                    user=settings.dicomweb_destination_user,
                    password=settings.dicomweb_destination_password,
                ),
                paths,
            )
        else:
            destination = Destination.parse(target)
            name, setting = destination.ae_title, "MEDBATCH_DICOM_DESTINATION"
            send_files(destination, settings.dicom_ae_title, paths)
    except DicomDestinationUnavailableError as exc:
        return wait_or_fail(
            self,
            job,
            settings,
            exc,
            what=f"destination {name}",
            remedy=f"Check the PACS and {setting}, then `medbatch retry`.",
        )
    except DicomSendError as exc:
        close(job, JobState.FAILED, settings, error=str(exc))
        return "failed"
    close(
        job,
        JobState.DONE,
        settings,
        summary={"sent": len(paths), "to": name},
    )
    return "done"
