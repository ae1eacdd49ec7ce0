"""Receiving one instance, whatever the front door: validate, store durably, register.

:class:`InstanceStore` takes the encoded instance (DICOM file format: preamble, file meta with
its transfer syntax, the dataset exactly as received, never re-encoded) and who sent it, and
answers a status with a reason. The DIMSE C-STORE handler is a thin caller of it; a DICOMweb
STOW-RS front door (or anything else) calls the same :meth:`InstanceStore.store`, so validation,
the durable write, the database row, de-duplication and study completion are one code path.

Success means stored: the file is written, fsync'd and its directory entry fsync'd (with S3
storage: the object's PUT answered), and its row committed, before :meth:`InstanceStore.store`
returns success (see :mod:`ingest.dicom.files` and :mod:`ingest.dicom.registry` for how those
local flushes are shared between instances in flight). The same SOP Instance UID is stored
once: a resend is answered success and audited, not stored. A
failure to store answers 0xA700 so the sender retries; a refused instance gets its status and
reason back and a ``dicom_rejections`` row.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

from core.errors import InstanceRefusedError
from core.settings import Settings
from core.storage import storage_for
from ingest.dicom.files import place, relative_path
from ingest.dicom.registry import Duplicate, GroupCommitter, NewInstance, Refusal
from ingest.dicom.validate import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STATUS_WRONG_STUDY,
    ReceivedInstance,
    inspect_instance,
)

log = logging.getLogger(__name__)

#: DICOM's Error Comment (LO) holds at most 64 characters.
COMMENT_MAX = 64


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: the calling AE title (or a front door's client name) and address."""

    ae_title: str
    address: str


@dataclass(frozen=True)
class StoreResult:
    """What to answer: ``status`` (a C-STORE status; 0x0000 success) and, on failure, the
    ``reason`` recorded and a ``comment`` short enough for the sender (≤ 64 characters)."""

    status: int
    reason: str = ""
    comment: str = ""
    study_id: int | None = None
    stored: bool = False  # False: a resend of an instance already stored, or a failure
    #: What the instance said it is (None where it could not be read that far).
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


def _described(result: StoreResult, inst: ReceivedInstance) -> StoreResult:
    return replace(
        result,
        sop_class_uid=inst.sop_class_uid,
        sop_instance_uid=inst.sop_instance_uid,
        study_uid=inst.study_uid,
        series_uid=inst.series_uid,
    )


class InstanceStore:
    """Validates, durably stores and registers received instances; thread-safe, one per process.

    ``close()`` commits what is in flight and stops the committing thread.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.dicom_storage_dir
        self.storage = storage_for(settings)
        self.committer = GroupCommitter(settings.database_url)

    def close(self) -> None:
        self.committer.close()

    def store(
        self,
        encoded: bytes,
        sender: Sender,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_uid: str | None = None,
    ) -> StoreResult:
        """Store one instance given as DICOM file format bytes.

        ``sop_class_uid``/``sop_instance_uid``: what the transfer announced (negotiated
        context, C-STORE request), checked against the dataset; None where there is none.
        ``study_uid``: the study the sender addressed (STOW-RS to ``/studies/{study}``); an
        instance of another study is refused.
        """
        try:
            inst = inspect_instance(
                encoded, context_sop_class=sop_class_uid, affected_sop_instance=sop_instance_uid
            )
        except InstanceRefusedError as exc:
            return self._refuse(sender, sop_class_uid, sop_instance_uid, exc.status, exc.reason)
        if study_uid is not None and inst.study_uid != study_uid:
            refused = self._refuse(
                sender,
                inst.sop_class_uid,
                inst.sop_instance_uid,
                STATUS_WRONG_STUDY,
                "the instance belongs to another study than the one addressed",
            )
            return _described(refused, inst)
        try:
            return _described(self._store_valid(inst, encoded, sender), inst)
        except Exception as exc:  # storage or database trouble: the sender must retry
            log.exception("could not store an instance from AE %r", sender.ae_title)
            refused = self._refuse(
                sender,
                sop_class_uid or inst.sop_class_uid,
                inst.sop_instance_uid,
                STATUS_OUT_OF_RESOURCES,
                f"could not store the instance ({type(exc).__name__}: {exc}); the sender "
                "should retry once storage/database are back",
                comment=f"storage failed ({type(exc).__name__}); retry later",
            )
            return _described(refused, inst)

    def _store_valid(self, inst: ReceivedInstance, encoded: bytes, sender: Sender) -> StoreResult:
        ae = sender.ae_title[:16]
        sha = hashlib.sha256(encoded).hexdigest()
        committer = self.committer
        if committer.stored_study(inst.sop_instance_uid) is not None:
            reg = committer.commit(Duplicate(inst.sop_instance_uid, sha, ae))
        elif not self.storage.is_local:
            # An S3 PUT is atomic and durable once answered; the row is committed after it.
            rel = relative_path(inst)
            self.storage.put(f"dicom/{rel.as_posix()}", encoded)
            reg = committer.commit(NewInstance(inst, str(rel), len(encoded), sha, ae))
        else:
            rel = relative_path(inst)
            placed = place(self.root / rel, encoded)
            ticket = committer.submit(
                NewInstance(inst, str(rel), len(encoded), sha, ae), directory=placed.path.parent
            )
            try:  # the committer fsyncs the directory meanwhile
                placed.sync()
            except BaseException as exc:
                ticket.file_synced(exc)
                raise
            ticket.file_synced()
            reg = ticket.wait(committer.timeout_s)
        if not reg.inserted:
            log.info("study %s: resent instance from AE %r already stored", reg.study_id, ae)
        return StoreResult(STATUS_SUCCESS, study_id=reg.study_id, stored=reg.inserted)

    def _refuse(
        self,
        sender: Sender,
        sop_class: str | None,
        sop_uid: str | None,
        status: int,
        reason: str,
        *,
        comment: str | None = None,
    ) -> StoreResult:
        """Record the refusal (a ``dicom_rejections`` row and its audit event) and answer it;
        ``comment`` is a shorter text for the sender when the reason does not fit."""
        log.warning("C-STORE from AE %r refused (0x%04X): %s", sender.ae_title, status, reason)
        try:
            self.committer.commit(
                Refusal(sender.ae_title, sender.address, sop_class, sop_uid, status, reason)
            )
        except Exception:  # the sender still gets its failure status
            log.exception("could not record a refused instance")
        return StoreResult(status, reason, (comment or reason)[:COMMENT_MAX])
