"""C-STORE our result objects to the configured destination AE (the PACS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE

from core.errors import ConfigurationError, DicomDestinationUnavailableError, DicomSendError

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """'PACS@10.0.0.5:104' → Destination; ConfigurationError when malformed."""
        ae, _, where = text.strip().partition("@")
        host, _, port = where.rpartition(":")
        if not ae or len(ae) > 16 or not host or not port.isdigit():
            raise ConfigurationError(
                f"MEDBATCH_DICOM_DESTINATION={text!r}: expected 'AE_TITLE@host:port'"
            )
        return cls(ae, host, int(port))


def send_files(destination: Destination, calling_ae: str, paths: list[Path]) -> None:
    """Send each file in one association; raises DicomSendError unless every one succeeded."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        state = "rejected the association" if assoc.is_rejected else "unreachable or aborted"
        error = DicomSendError if assoc.is_rejected else DicomDestinationUnavailableError
        raise error(
            f"destination {destination.ae_title}@{destination.host}:{destination.port} "
            f"{state}; check MEDBATCH_DICOM_DESTINATION and that it accepts AE {calling_ae}"
        )
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.get("Status", -1)) if status else -1
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                comment = str(status.get("ErrorComment", "")) if status else "no response"
                raise DicomSendError(
                    f"destination {destination.ae_title} answered 0x{code & 0xFFFF:04X} "
                    f"to a {ds.SOPClassUID.name}: {comment or 'no comment'}"
                )
    finally:
        if assoc.is_established:
            assoc.release()
