"""Received DICOM studies and what medbatch made of them."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFoundError, StorageError, StorageUnavailableError
from core.job_kinds import JobKind
from core.settings import Settings
from core.storage import storage_for
from db import audit
from db.models import DicomInstance, DicomResult, DicomStudy, Job, JobState
from db.session import session_scope


class StudyNotFoundError(NotFoundError):
    """No study with that Study Instance UID; `medbatch studies` lists the ones received."""


class KeyImageNotFoundError(NotFoundError):
    """The study has no key image: not scored yet, or not applicable (no usable CT series)."""


@dataclass(frozen=True)
class ResultInfo:
    version: int
    job_id: int
    model_name: str
    model_version: str
    study_probability: float
    series_uid: str
    most_suspicious_sop_uid: str
    instance_count: int
    created_at: datetime
    slice_scores: dict[str, float] = field(default_factory=dict)
    sr_path: str | None = None
    sc_path: str | None = None

    @classmethod
    def of(cls, r: DicomResult, *, with_slices: bool = False) -> ResultInfo:
        return cls(
            version=r.version,
            job_id=int(r.job_id),
            model_name=r.model_name,
            model_version=r.model_version,
            study_probability=float(r.study_probability),
            series_uid=r.series_uid,
            most_suspicious_sop_uid=r.most_suspicious_sop_uid,
            instance_count=r.instance_count,
            created_at=r.created_at,
            slice_scores={k: float(v) for k, v in r.slice_scores.items()} if with_slices else {},
            sr_path=r.sr_path,
            sc_path=r.sc_path,
        )


@dataclass(frozen=True)
class StudyInfo:
    id: int
    study_uid: str
    calling_ae: str
    instance_count: int
    open: bool
    version: int
    first_instance_at: datetime
    last_instance_at: datetime
    newest: ResultInfo | None = None
    results: list[ResultInfo] = field(default_factory=list)
    series: dict[str, int] = field(default_factory=dict)  # series UID → instances
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _newest(session: Session, study_id: int) -> DicomResult | None:
    return session.scalars(
        select(DicomResult)
        .where(DicomResult.study_id == study_id)
        .order_by(DicomResult.version.desc())
        .limit(1)
    ).first()


def _info(session: Session, study: DicomStudy, **extra: Any) -> StudyInfo:
    newest = _newest(session, study.id)
    return StudyInfo(
        id=int(study.id),
        study_uid=study.study_uid,
        calling_ae=study.calling_ae,
        instance_count=study.instance_count,
        open=study.open,
        version=study.version,
        first_instance_at=study.first_instance_at,
        last_instance_at=study.last_instance_at,
        newest=ResultInfo.of(newest) if newest is not None else None,
        **extra,
    )


def list_studies(settings: Settings, *, actor: str, limit: int = 20) -> list[StudyInfo]:
    """The newest received studies with their newest result."""
    with session_scope(settings.database_url) as session:
        audit.append(session, actor=actor, action="studies.read", subject="*")
        studies = session.scalars(select(DicomStudy).order_by(DicomStudy.id.desc()).limit(limit))
        return [_info(session, s) for s in studies]


def show_study(settings: Settings, study_uid: str, *, actor: str) -> StudyInfo:
    """One study: its series, every result version (per-slice scores, the SR and SC it
    produced) and its scoring jobs."""
    with session_scope(settings.database_url) as session:
        study = session.scalars(select(DicomStudy).where(DicomStudy.study_uid == study_uid)).first()
        if study is None:
            raise StudyNotFoundError(
                "no study with that Study Instance UID; `medbatch studies` lists the received ones"
            )
        audit.append(session, actor=actor, action="studies.read", subject=f"study:{study.id}")
        series: dict[str, int] = {}
        for uid in session.scalars(
            select(DicomInstance.series_uid).where(DicomInstance.study_id == study.id)
        ):
            series[uid] = series.get(uid, 0) + 1
        results = [
            ResultInfo.of(r, with_slices=True)
            for r in session.scalars(
                select(DicomResult)
                .where(DicomResult.study_id == study.id)
                .order_by(DicomResult.version)
            )
        ]
        jobs = [
            {"id": int(j.id), "kind": j.kind, "state": j.state, "error": j.error}
            for j in session.scalars(
                select(Job).where(Job.source == f"dicom-study:{study.id}").order_by(Job.id)
            )
        ]
        return _info(session, study, results=results, series=series, jobs=jobs)


def study_job_outcome(settings: Settings, study_uid: str) -> tuple[str, float | None] | None:
    """(state, probability) of the newest scoring job of a study, once it has ended; None while
    it has not (or no job exists yet). What a sender polls for after pushing a study."""
    with session_scope(settings.database_url) as session:
        study_id = session.scalar(select(DicomStudy.id).where(DicomStudy.study_uid == study_uid))
        if study_id is None:
            return None
        job = session.scalars(
            select(Job)
            .where(Job.kind == JobKind.DICOM_STUDY.value, Job.source == f"dicom-study:{study_id}")
            .order_by(Job.id.desc())
        ).first()
        if job is None or not JobState(job.state).terminal:
            return None
        result = session.scalars(select(DicomResult).where(DicomResult.job_id == job.id)).first()
        return job.state, (float(result.study_probability) if result else None)


def key_image_png(
    settings: Settings, study_uid: str, *, actor: str, version: int | None = None
) -> bytes:
    """The key-slice secondary capture medbatch produced for a study (its newest result, or
    ``version``) as a PNG: what the PACS received, for a browser. Audited as a read."""
    import pydicom
    from PIL import Image

    with session_scope(settings.database_url) as session:
        study = session.scalars(select(DicomStudy).where(DicomStudy.study_uid == study_uid)).first()
        if study is None:
            raise StudyNotFoundError(
                "no study with that Study Instance UID; `medbatch studies` lists the received ones"
            )
        query = select(DicomResult).where(DicomResult.study_id == study.id)
        if version is not None:
            query = query.where(DicomResult.version == version)
        result = session.scalars(query.order_by(DicomResult.version.desc()).limit(1)).first()
        if result is None or not result.sc_path:
            raise KeyImageNotFoundError(
                f"study {study.id} has no key image"
                + (f" in version {version}" if version is not None else "")
                + ": it has not been scored yet, or was not applicable (`medbatch studies`)"
            )
        audit.append(
            session,
            actor=actor,
            action="studies.read",
            subject=f"study:{study.id}",
            details={"key_image": result.version},
        )
        relative = result.sc_path
    try:
        data = storage_for(settings).get(relative)
    except StorageUnavailableError:
        raise
    except StorageError as exc:
        raise KeyImageNotFoundError(
            f"the key image of study {study.id} is missing from storage ({relative}): {exc}; "
            "was MEDBATCH_STORAGE_URL changed or the storage cleaned up?"
        ) from exc
    pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
