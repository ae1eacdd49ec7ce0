"""Our result objects back to the PACS: C-STORE to the destination AE, or STOW-RS to a DICOMweb
destination (``dicomweb:<service root>``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
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


DICOMWEB = "dicomweb:"


@dataclass(frozen=True)
class WebDestination:
    """A DICOMweb service root that takes STOW-RS, with a bearer token or basic credentials."""

    url: str
    token: str = ""
    user: str = ""
    password: str = ""

    def session(self) -> requests.Session:
        session = requests.Session()
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user:
            session.auth = (self.user, self.password)
        return session


def send_dicomweb(destination: WebDestination, paths: list[Path]) -> None:
    """STOW-RS the files in one request; raises :class:`DicomDestinationUnavailableError` while
    the destination cannot be reached or answers 5xx (the send waits), :class:`DicomSendError`
    when it refuses them."""
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(p) for p in paths]
    client = DICOMwebClient(destination.url, session=destination.session())
    try:
        response = client.store_instances(datasets)
    except requests.ConnectionError as exc:
        raise DicomDestinationUnavailableError(
            f"DICOMweb destination {destination.url} unreachable ({type(exc).__name__})"
        ) from exc
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        error = DicomDestinationUnavailableError if status >= 500 else DicomSendError
        raise error(
            f"DICOMweb destination {destination.url} answered HTTP {status} to STOW-RS; "
            "check MEDBATCH_DICOMWEB_DESTINATION and its credentials"
        ) from exc
    failed = response.get("FailedSOPSequence", [])
    if failed:
        reasons = ", ".join(f"0x{int(item.FailureReason):04X}" for item in failed)
        raise DicomSendError(
            f"DICOMweb destination {destination.url} refused {len(failed)} of {len(datasets)} "
            f"objects (FailureReason {reasons})"
        )
