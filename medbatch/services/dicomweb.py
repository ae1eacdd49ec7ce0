"""DICOMweb over what medbatch holds: STOW-RS stores through the listener's own front door
(:class:`ingest.dicom.store.InstanceStore`), QIDO-RS searches the received studies and the
objects medbatch produced, WADO-RS retrieves those objects (the SR and the key-image secondary
capture), so a DICOMweb-only site sends studies and pulls results without DIMSE."""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core.errors import InputError, NotFoundError
from core.job_kinds import JobKind
from core.settings import Settings
from core.storage import storage_for
from db import audit
from db.models import DicomInstance, DicomOutput, DicomStudy
from db.session import read_scope, session_scope
from ingest.dicom.store import InstanceStore, Sender, StoreResult
from ingest.dicom.validate import STATUS_CANNOT_UNDERSTAND

#: The study-level matching keys QIDO-RS answers, by keyword and by tag.
STUDY_KEYS = {
    "StudyInstanceUID": "0020000D",
    "AccessionNumber": "00080050",
    "StudyDate": "00080020",
    "ModalitiesInStudy": "00080061",
}
_BY_TAG = {tag: keyword for keyword, tag in STUDY_KEYS.items()}
#: Not matching keys: paging and what to include.
PAGING_KEYS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_DATE = re.compile(r"^\d{8}$")
__all__ = [
    "Completion",
    "InstanceStore",
    "Sender",
    "StowOutcome",
    "StudyQuery",
    "open_store",
    "retrieve",
    "search_instances",
    "search_series",
    "search_studies",
    "store_response",
]
log = logging.getLogger(__name__)
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class DicomWebNotFoundError(NotFoundError):
    """No such study, series or instance among those medbatch holds or produced."""


# --- STOW-RS --------------------------------------------------------------------------------------
@dataclass
class StowOutcome:
    """What a store request did, part by part, for the PS3.18 store response."""

    stored: list[StoreResult] = field(default_factory=list)
    failed: list[StoreResult] = field(default_factory=list)

    @property
    def status(self) -> int:
        """200 every instance stored, 202 some, 409 none (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409


def open_store(settings: Settings) -> InstanceStore:
    """The front door of received instances for this process (one group-commit thread)."""
    return InstanceStore(settings)


def stow_part(
    store: InstanceStore, outcome: StowOutcome, encoded: bytes, sender: Sender, study: str | None
) -> None:
    """Store one part: exactly what the C-STORE listener does with one instance."""
    result = store.store(encoded, sender, study_uid=study)
    (outcome.stored if result.ok else outcome.failed).append(result)


def refuse_part(outcome: StowOutcome, reason: str) -> None:
    """A part that cannot be an instance (wrong media type): failed, with the reason."""
    outcome.failed.append(StoreResult(STATUS_CANNOT_UNDERSTAND, reason, reason[:64]))


def store_response(outcome: StowOutcome, base_url: str, study: str | None) -> dict[str, Any]:
    """The store response as DICOM JSON: ReferencedSOPSequence, FailedSOPSequence with a
    FailureReason and the reason text (Error Comment) of each refused part."""
    ds = Dataset()
    if study is not None and outcome.stored:
        ds.RetrieveURL = f"{base_url}/studies/{study}"
    referenced = []
    for r in outcome.stored:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class_uid
        item.ReferencedSOPInstanceUID = r.sop_instance_uid
        item.RetrieveURL = (
            f"{base_url}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_instance_uid}"
        )
        referenced.append(item)
    failed = []
    for r in outcome.failed:
        item = Dataset()
        if r.sop_class_uid:
            item.ReferencedSOPClassUID = r.sop_class_uid
        if r.sop_instance_uid:
            item.ReferencedSOPInstanceUID = r.sop_instance_uid
        item.FailureReason = r.status
        item.add_new(0x00000902, "LO", r.comment or r.reason[:64])  # Error Comment
        failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    body: dict[str, Any] = ds.to_json_dict()
    return body


def audit_stow(
    settings: Settings, actor: str, outcome: StowOutcome, client: str, study: str | None
) -> None:
    """A STOW-RS request is audited like an association: who, from where, what it did."""
    studies = sorted({r.study_id for r in outcome.stored if r.study_id is not None})
    with session_scope(settings.database_url) as session:
        audit.append(
            session,
            actor=actor,
            action="dicomweb.stow",
            subject=f"peer:{client}",
            details={
                "stored": sum(r.stored for r in outcome.stored),
                "already_stored": sum(not r.stored for r in outcome.stored),
                "failed": len(outcome.failed),
                "studies": studies,
                "addressed_study": study is not None,
            },
        )


# --- QIDO-RS --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyQuery:
    uids: tuple[str, ...] = ()
    accession: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    limit: int = 100
    offset: int = 0

    @classmethod
    def parse(cls, params: Iterable[tuple[str, str]]) -> StudyQuery:
        """From query parameters (keywords or tags); :class:`InputError` for keys it cannot
        match on and for malformed values."""
        values: dict[str, str] = {}
        for key, value in params:
            keyword = _BY_TAG.get(key.upper(), key)
            if keyword in PAGING_KEYS or key in PAGING_KEYS:
                values[key] = value
                continue
            if keyword not in STUDY_KEYS:
                raise InputError(
                    f"cannot search studies by {key!r}; matching keys: {', '.join(STUDY_KEYS)}"
                )
            values[keyword] = value
        date_from = date_to = None
        if date := values.get("StudyDate"):
            low, dash, high = date.partition("-")
            for part in (low, high) if dash else (low,):
                if part and not _DATE.match(part):
                    raise InputError(f"StudyDate {date!r}: use YYYYMMDD or a range A-B, -B, A-")
            date_from, date_to = (low or None, high or None) if dash else (low, low)
        try:
            limit = int(values.get("limit", "100"))
            offset = int(values.get("offset", "0"))
        except ValueError as exc:
            raise InputError("limit and offset must be whole numbers") from exc
        if not 1 <= limit <= 1000 or offset < 0:
            raise InputError("limit must be 1 to 1000 and offset 0 or more")
        uids = tuple(
            u for u in values.get("StudyInstanceUID", "").replace("\\", ",").split(",") if u
        )
        return cls(
            uids=uids,
            accession=values.get("AccessionNumber") or None,
            date_from=date_from,
            date_to=date_to,
            modality=values.get("ModalitiesInStudy") or None,
            limit=limit,
            offset=offset,
        )


def _wildcard(text: str) -> str:
    return text.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")


def _modalities(session: Session, study_id: int) -> list[str]:
    received = session.scalars(
        select(DicomInstance.modality).where(DicomInstance.study_id == study_id).distinct()
    )
    produced = session.scalars(
        select(DicomOutput.modality).where(DicomOutput.study_id == study_id).distinct()
    )
    return sorted({m for m in [*received, *produced] if m})


def _study_json(session: Session, study: DicomStudy, base_url: str) -> dict[str, Any]:
    series = session.scalar(
        select(func.count(func.distinct(DicomInstance.series_uid))).where(
            DicomInstance.study_id == study.id
        )
    )
    out_series, out_instances = session.execute(
        select(func.count(func.distinct(DicomOutput.series_uid)), func.count()).where(
            DicomOutput.study_id == study.id
        )
    ).one()
    ds = Dataset()
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date or ""
    ds.AccessionNumber = study.accession_number or ""
    ds.ModalitiesInStudy = _modalities(session, study.id)
    ds.NumberOfStudyRelatedSeries = int(series or 0) + int(out_series or 0)
    ds.NumberOfStudyRelatedInstances = study.instance_count + int(out_instances or 0)
    ds.RetrieveURL = f"{base_url}/studies/{study.study_uid}"
    body: dict[str, Any] = ds.to_json_dict()
    return body


def search_studies(
    settings: Settings, query: StudyQuery, *, base_url: str, actor: str
) -> list[dict[str, Any]]:
    """The received studies that match, newest first, as DICOM JSON."""
    stmt = select(DicomStudy).order_by(DicomStudy.id.desc())
    if query.uids:
        stmt = stmt.where(DicomStudy.study_uid.in_(query.uids))
    if query.accession:
        stmt = stmt.where(DicomStudy.accession_number.like(_wildcard(query.accession), "\\"))
    if query.date_from:
        stmt = stmt.where(DicomStudy.study_date >= query.date_from)
    if query.date_to:
        stmt = stmt.where(DicomStudy.study_date <= query.date_to)
    if query.modality:
        stmt = stmt.where(
            or_(
                DicomStudy.id.in_(
                    select(DicomInstance.study_id).where(DicomInstance.modality == query.modality)
                ),
                DicomStudy.id.in_(
                    select(DicomOutput.study_id).where(DicomOutput.modality == query.modality)
                ),
            )
        )
    stmt = stmt.limit(query.limit).offset(query.offset)
    _audit_read(settings, actor, "dicomweb.search", "dicomweb:studies")
    with read_scope(settings.database_url) as session:
        return [_study_json(session, s, base_url) for s in session.scalars(stmt)]


def _study(session: Session, study_uid: str) -> DicomStudy:
    study = session.scalars(select(DicomStudy).where(DicomStudy.study_uid == study_uid)).first()
    if study is None:
        raise DicomWebNotFoundError("no study with that Study Instance UID is held here")
    return study


def _outputs(
    session: Session, study_uid: str, series_uid: str | None, sop_uid: str | None
) -> tuple[DicomStudy, list[DicomOutput]]:
    study = _study(session, study_uid)
    stmt = select(DicomOutput).where(DicomOutput.study_id == study.id)
    if series_uid is not None:
        stmt = stmt.where(DicomOutput.series_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(DicomOutput.sop_instance_uid == sop_uid)
    found = list(session.scalars(stmt.order_by(DicomOutput.id)))
    if not found and (series_uid is not None or sop_uid is not None):
        raise DicomWebNotFoundError(
            "no such series or instance among the objects medbatch produced for this study"
        )
    return study, found


def search_series(
    settings: Settings, study_uid: str, *, base_url: str, actor: str
) -> list[dict[str, Any]]:
    """The series medbatch produced in a study (the SR, the secondary capture)."""
    _audit_read(settings, actor, "dicomweb.search", "dicomweb:series")
    with read_scope(settings.database_url) as session:
        _, outputs = _outputs(session, study_uid, None, None)
        by_series: dict[str, list[DicomOutput]] = {}
        for o in outputs:
            by_series.setdefault(o.series_uid, []).append(o)
    found = []
    for series_uid, items in by_series.items():
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = items[0].modality
        ds.SeriesNumber = items[0].series_number
        ds.NumberOfSeriesRelatedInstances = len(items)
        ds.RetrieveURL = f"{base_url}/studies/{study_uid}/series/{series_uid}"
        found.append(ds.to_json_dict())
    return found


def search_instances(
    settings: Settings, study_uid: str, series_uid: str | None, *, base_url: str, actor: str
) -> list[dict[str, Any]]:
    _audit_read(settings, actor, "dicomweb.search", "dicomweb:instances")
    with read_scope(settings.database_url) as session:
        _, outputs = _outputs(session, study_uid, series_uid, None)
    found = []
    for o in outputs:
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = o.series_uid
        ds.SOPClassUID = o.sop_class_uid
        ds.SOPInstanceUID = o.sop_instance_uid
        ds.Modality = o.modality
        ds.RetrieveURL = (
            f"{base_url}/studies/{study_uid}/series/{o.series_uid}/instances/{o.sop_instance_uid}"
        )
        found.append(ds.to_json_dict())
    return found


# --- WADO-RS --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retrieved:
    data: bytes  # the object as stored (SR and key images: small)
    transfer_syntax_uid: str
    size_bytes: int


def retrieve(
    settings: Settings,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    actor: str,
) -> list[Retrieved]:
    """The files of the objects medbatch produced in the study (or series, or one instance)."""
    with read_scope(settings.database_url) as session:
        study, outputs = _outputs(session, study_uid, series_uid, sop_uid)
        study_id = int(study.id)
    if not outputs:
        raise DicomWebNotFoundError("medbatch has produced no object in this study yet")
    _audit_read(settings, actor, "dicomweb.retrieve", f"dicom-study:{study_id}", len(outputs))
    found = []
    storage = storage_for(settings)
    for o in outputs:
        data = storage.get(o.path)
        meta = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=[]
        ).file_meta
        found.append(Retrieved(data, str(meta.TransferSyntaxUID), o.size_bytes))
    return found


def metadata(files: list[Retrieved]) -> list[dict[str, Any]]:
    """DICOM JSON of each file without its bulk data (pixels and other binary values)."""
    out = []
    for f in files:
        ds = pydicom.dcmread(io.BytesIO(f.data), stop_before_pixels=True)
        for elem in list(ds.iterall()):
            if elem.VR in _BINARY_VRS:
                del ds[elem.tag]
        out.append(ds.to_json_dict())
    return out


def multipart_related(files: list[Retrieved], boundary: str) -> Iterator[bytes]:
    """The files as one multipart/related body, streamed file by file."""
    for f in files:
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; "
            f"transfer-syntax={f.transfer_syntax_uid}\r\nContent-Length: {f.size_bytes}\r\n\r\n"
        ).encode()
        yield f.data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _audit_read(settings: Settings, actor: str, action: str, subject: str, n: int = 0) -> None:
    with session_scope(settings.database_url) as session:
        audit.append(session, actor=actor, action=action, subject=subject, details={"objects": n})


class Completion:
    """Closes studies after their quiet period, whichever door their instances came through,
    and publishes their scoring jobs (the listener does the same; the row lock keeps it once).
    Run by the API process so that a DICOMweb-only site needs no listener."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicomweb-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> list[int]:
        from ingest.dicom.completion import close_quiet_studies
        from workers.dispatch import publish

        jobs = close_quiet_studies(self.settings, actor=audit.current_actor("api"))
        for job_id in jobs:
            try:
                publish(job_id, JobKind.DICOM_STUDY.value)
            except Exception:  # the sweeper publishes it later
                log.exception("could not publish the scoring job of a completed study")
        return jobs

    def _run(self) -> None:
        while not self._stop.wait(self.settings.dicom_completion_poll_s):
            try:
                self.check()
            except Exception:
                log.exception("study completion check failed; retrying")
