"""Decide whether a received dataset may be stored, before anything is written.

pydicom reads a truncated stream without complaint (a short Pixel Data value, a missing
sequence delimiter only warns), so completeness is checked here explicitly: the identifying UIDs,
that the object is an image, and that its pixel data holds every byte the header promises.
Refusals carry the C-STORE status the sender gets and a reason an integration engineer can act on.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass

import pydicom
from pydicom.encaps import generate_fragments
from pydicom.uid import UID

from core.errors import InstanceRefusedError
from db.audit import subject_digest

#: C-STORE statuses (PS3.4 Annex B.2.3); failures make a PACS retry or report the object.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
#: STOW-RS to /studies/{study} with an instance of another study (as Azure and Orthanc answer).
STATUS_WRONG_STUDY = 0xA901

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ReceivedInstance:
    """What the store and the database need from one accepted instance (no patient data)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    patient_digest: str
    accession_number: str = ""  # what a DICOMweb search (QIDO-RS) finds a study by
    study_date: str = ""


def _refuse(status: int, reason: str) -> InstanceRefusedError:
    return InstanceRefusedError(status, reason)


def _expected_native_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    bits = int(ds.BitsAllocated)
    return math.ceil(pixels * bits / 8)


def _check_pixel_data(ds: pydicom.Dataset, transfer_syntax: UID) -> None:
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise _refuse(
                STATUS_CANNOT_UNDERSTAND,
                f"image without {keyword}: the dataset is truncated or incomplete",
            )
    data = ds.PixelData
    if transfer_syntax.is_encapsulated:
        try:
            n_fragments = sum(1 for _ in generate_fragments(data))
        except ValueError as exc:
            raise _refuse(
                STATUS_CANNOT_UNDERSTAND, f"compressed pixel data is malformed or truncated: {exc}"
            ) from exc
        if n_fragments == 0:
            raise _refuse(STATUS_CANNOT_UNDERSTAND, "compressed pixel data holds no fragment")
        return
    expected = _expected_native_bytes(ds)
    if len(data) < expected:
        raise _refuse(
            STATUS_CANNOT_UNDERSTAND,
            f"truncated: Pixel Data holds {len(data)} of the {expected} bytes that Rows x "
            "Columns x Samples x Bits Allocated x Frames require",
        )


def inspect_instance(
    encoded: bytes,
    *,
    context_sop_class: str | None = None,
    affected_sop_instance: str | None = None,
) -> ReceivedInstance:
    """Parse a received dataset (DICOM file format bytes) and check it is complete.

    ``context_sop_class`` and ``affected_sop_instance`` are what the transfer announced (the
    negotiated presentation context, the C-STORE request); None where the front door has none.
    Raises :class:`InstanceRefusedError` with the status to send back.
    """
    # catch_warnings swaps process-wide state: with several associations parsing at once, one
    # thread's truncation warning could land in another's list, so parses capture one at a time.
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(encoded))
        except Exception as exc:  # pydicom raises many types on garbage
            raise _refuse(
                STATUS_CANNOT_UNDERSTAND, f"cannot be decoded as DICOM: {type(exc).__name__}: {exc}"
            ) from exc
    problems = [str(w.message) for w in caught if "delimiter" in str(w.message).lower()]
    if problems:
        raise _refuse(STATUS_CANNOT_UNDERSTAND, f"truncated: {problems[0]}")

    missing = [k for k in REQUIRED_UIDS if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise _refuse(STATUS_DOES_NOT_MATCH, f"missing required UID(s): {', '.join(missing)}")
    bad = [k for k in REQUIRED_UIDS if not UID(str(ds.get(k))).is_valid]
    if bad:
        raise _refuse(STATUS_DOES_NOT_MATCH, f"malformed UID(s): {', '.join(bad)}")
    sop_class = UID(str(ds.SOPClassUID))
    if context_sop_class is not None and sop_class != context_sop_class:
        raise _refuse(
            STATUS_DOES_NOT_MATCH,
            f"SOP Class UID {sop_class} differs from the negotiated {context_sop_class}",
        )
    if affected_sop_instance and str(ds.SOPInstanceUID) != affected_sop_instance:
        raise _refuse(
            STATUS_DOES_NOT_MATCH,
            "SOP Instance UID in the dataset differs from the C-STORE Affected SOP Instance UID",
        )
    if "Image Storage" not in sop_class.name:
        raise _refuse(
            STATUS_DOES_NOT_MATCH,
            f"not an image ({sop_class.name or sop_class}): medbatch scores images only",
        )
    if "PixelData" not in ds:
        raise _refuse(
            STATUS_CANNOT_UNDERSTAND,
            "image without Pixel Data (7FE0,0010): the dataset is truncated or incomplete",
        )
    transfer_syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    _check_pixel_data(ds, transfer_syntax)
    return ReceivedInstance(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(sop_class),
        transfer_syntax_uid=str(transfer_syntax),
        modality=str(ds.get("Modality", "") or "")[:16],
        patient_digest=subject_digest(str(ds.get("PatientID", "") or "")),
        accession_number=str(ds.get("AccessionNumber", "") or "")[:16],
        study_date=str(ds.get("StudyDate", "") or "")[:8],
    )
