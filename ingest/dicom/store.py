"""Durable storage of one received instance: file first (atomic, fsync'd), then its row.

Only when both are committed does the listener answer Success, so a PACS that got Success can
forget the instance. A crash in between leaves at most an orphan file that the resend replaces.
The same SOP Instance UID is stored once: a resend is answered Success and audited, not stored.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from core.settings import Settings
from db import audit
from db.insert_ignore import insert_ignore
from db.models import DicomInstance, DicomStudy, utcnow
from db.session import session_scope
from ingest.dicom.validate import ReceivedInstance


@dataclass(frozen=True)
class StoreOutcome:
    study_id: int
    stored: bool  # False: the SOP instance was already stored (a resend)


def relative_path(inst: ReceivedInstance) -> Path:
    """study/series/instance layout; UIDs are digits and dots, safe as file names."""
    return Path(inst.study_uid) / inst.series_uid / f"{inst.sop_instance_uid}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p, fsync'ing each parent of a directory it creates (so the entry survives a crash)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename, fsync the directory."""
    _make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _already_stored(settings: Settings, sop_instance_uid: str) -> int | None:
    with session_scope(settings.database_url) as session:
        return session.scalar(
            select(DicomInstance.study_id).where(DicomInstance.sop_instance_uid == sop_instance_uid)
        )


def _audit_duplicate(
    settings: Settings, study_id: int, sop_instance_uid: str, calling_ae: str, sha: str
) -> None:
    with session_scope(settings.database_url) as session:
        stored_sha = session.scalar(
            select(DicomInstance.sha256).where(DicomInstance.sop_instance_uid == sop_instance_uid)
        )
        audit.append(
            session,
            actor=f"ae:{calling_ae}",
            action="dicom.duplicate",
            subject=f"dicom-study:{study_id}",
            details={"same_content": stored_sha == sha},
        )


def store_instance(
    settings: Settings, inst: ReceivedInstance, encoded: bytes, *, calling_ae: str
) -> StoreOutcome:
    """Store one validated instance durably and register it; idempotent per SOP Instance UID."""
    sha = hashlib.sha256(encoded).hexdigest()
    existing = _already_stored(settings, inst.sop_instance_uid)
    if existing is not None:
        _audit_duplicate(settings, existing, inst.sop_instance_uid, calling_ae, sha)
        return StoreOutcome(existing, stored=False)

    rel = relative_path(inst)
    write_atomic(settings.dicom_storage_dir / rel, encoded)

    now = utcnow()
    with session_scope(settings.database_url) as session:
        insert_ignore(
            session,
            DicomStudy,
            [
                {
                    "study_uid": inst.study_uid,
                    "patient_digest": inst.patient_digest,
                    "calling_ae": calling_ae,
                    "open": True,
                    "version": 0,
                    "instance_count": 0,
                    "first_instance_at": now,
                    "last_instance_at": now,
                }
            ],
            ("study_uid",),
        )
        study = session.scalars(
            select(DicomStudy).where(DicomStudy.study_uid == inst.study_uid).with_for_update()
        ).one()
        inserted = insert_ignore(
            session,
            DicomInstance,
            [
                {
                    "study_id": study.id,
                    "batch": study.version + 1,
                    "series_uid": inst.series_uid,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "sop_class_uid": inst.sop_class_uid,
                    "transfer_syntax_uid": inst.transfer_syntax_uid,
                    "modality": inst.modality,
                    "path": str(rel),
                    "size_bytes": len(encoded),
                    "sha256": sha,
                    "calling_ae": calling_ae,
                    "received_at": now,
                }
            ],
            ("sop_instance_uid",),
        )
        if inserted:
            reopened = not study.open
            session.execute(
                update(DicomStudy)
                .where(DicomStudy.id == study.id)
                .values(
                    open=True,
                    last_instance_at=now,
                    instance_count=DicomStudy.instance_count + 1,
                )
            )
            audit.append(
                session,
                actor=f"ae:{calling_ae}",
                action="dicom.stored",
                subject=f"dicom-study:{study.id}",
                details={
                    "batch": study.version + 1,
                    "modality": inst.modality,
                    "bytes": len(encoded),
                    "sha256": sha,
                    **({"reopened_after_version": study.version} if reopened else {}),
                },
            )
        study_id = study.id
    if not inserted:  # another association stored it between our check and our insert
        _audit_duplicate(settings, study_id, inst.sop_instance_uid, calling_ae, sha)
    return StoreOutcome(study_id, stored=bool(inserted))
