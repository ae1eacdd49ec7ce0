"""``medbatch listen``: the DICOM application entity a PACS or a modality pushes studies to.

- Verification (C-ECHO) and C-STORE for every storage SOP class in the usual transfer syntaxes.
- The calling AE (and optionally its address) is checked against the allow-list when the
  association is requested; refusals are audited.
- Each instance is validated, written atomically and registered in the database before the
  C-STORE response; any failure to store answers a failure status so the sender retries.
- A watcher thread closes studies after the quiet period and enqueues their scoring job.

Logs name studies by their database id and senders by AE title, never by patient identifiers.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from core.errors import ConfigurationError
from core.job_kinds import JobKind
from core.settings import Settings
from db import audit
from db.session import session_scope
from ingest.dicom.access import AccessPolicy
from ingest.dicom.completion import close_quiet_studies
from ingest.dicom.processes import HelperPool
from ingest.dicom.store import InstanceStore, Sender, StoreResult
from ingest.dicom.validate import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS

log = logging.getLogger(__name__)

Publisher = Callable[[int, str], None]

#: Transfer syntaxes we accept: uncompressed, deflated, JPEG (baseline, extended, lossless),
#: JPEG-LS, JPEG 2000 and RLE; pylibjpeg's plug-ins decode them when the worker reads pixels.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline 8 Bit
    "1.2.840.10008.1.2.4.51",  # JPEG Extended 12 Bit
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# Reject reason (A-ASSOCIATE-RJ): rejected-permanent, service-user, calling AE not recognised.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)


def _peer(event: evt.Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    # At EVT_REQUESTED only the A-ASSOCIATE-RQ primitive is filled in, not requestor.ae_title.
    primitive = requestor.primitive
    ae_title = primitive.calling_ae_title if primitive is not None else requestor.ae_title
    if isinstance(ae_title, bytes):
        ae_title = ae_title.decode("ascii", "replace")
    return str(ae_title).strip(), str(requestor.address)


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the listener when a certificate is configured; client certificates if a CA is."""
    if settings.dicom_tls_cert is None:
        return None
    if settings.dicom_tls_key is None:
        raise ConfigurationError("MEDBATCH_DICOM_TLS_CERT is set but MEDBATCH_DICOM_TLS_KEY is not")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
    if settings.dicom_tls_ca is not None:
        ctx.load_verify_locations(settings.dicom_tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Listener:
    """The storage SCP plus its study-completion watcher; ``start()`` returns once listening."""

    def __init__(
        self, settings: Settings, publisher: Publisher | None, *, reuse_port: bool = False
    ) -> None:
        """``publisher`` None: a helper process (no study completion, no helpers of its own)."""
        self.settings = settings
        self.publisher = publisher
        self.reuse_port = reuse_port
        self.policy = AccessPolicy.from_settings(
            settings.dicom_allowed_aes, settings.dicom_allow_any_ae
        )
        self.ae = AE(ae_title=settings.dicom_ae_title)
        self.ae.maximum_associations = settings.dicom_max_associations
        self.ae.maximum_pdu_size = settings.dicom_max_pdu
        self.ae.network_timeout = 60
        self.ae.dimse_timeout = 60
        self.ae.acse_timeout = 30
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:3])
        self.actor = f"listener:{settings.dicom_ae_title}"
        self._server: Any = None
        self.store: InstanceStore | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._helpers: HelperPool | None = None

    # --- association-level events ----------------------------------------------------------
    def _audit_peer(
        self, ae_title: str, address: str, action: str, details: dict[str, Any]
    ) -> None:
        with session_scope(self.settings.database_url) as session:
            audit.append(
                session,
                actor=f"ae:{ae_title[:16]}",
                action=action,
                subject=f"peer:{address}",
                details=details,
            )

    def _on_requested(self, event: evt.Event) -> None:
        ae_title, address = _peer(event)
        if self.policy.allows(ae_title, address):
            return
        log.warning(
            "association from AE %r at %s refused: not on the allow-list", ae_title, address
        )
        # Audited before the peer hears the refusal: whoever sees the rejection finds its event.
        self._audit_peer(
            ae_title,
            address,
            "dicom.association_refused",
            {"reason": "calling AE title/address not on the allow-list"},
        )
        event.assoc.acse.send_reject(*_REJECT_CALLING_AE)
        # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is out and
        # the peer has closed, so the sender reads the reason instead of a reset connection.
        event.assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        ae_title, address = _peer(event)
        self._audit_peer(
            ae_title,
            address,
            "dicom.association",
            {"called_ae": self.settings.dicom_ae_title, "listener_pid": os.getpid()},
        )

    # --- DIMSE services ----------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """Thin: the instance as received (file meta + dataset bytes) goes to the store."""
        ae_title, address = _peer(event)
        request: Any = event.request
        store = self.store
        if store is None:  # stopping
            result = StoreResult(STATUS_OUT_OF_RESOURCES, comment="listener stopping; retry")
        else:
            result = store.store(
                event.encoded_dataset(include_meta=True),
                Sender(ae_title, address),
                sop_class_uid=str(event.context.abstract_syntax),
                sop_instance_uid=str(request.AffectedSOPInstanceUID or "") or None,
            )
        if result.ok:
            return STATUS_SUCCESS
        rsp = Dataset()
        rsp.Status = result.status
        rsp.ErrorComment = result.comment
        return rsp

    # --- completion watcher ------------------------------------------------------------------
    def check_completion(self) -> list[int]:
        """Close quiet studies and publish their jobs (the sweeper does the same as a backstop)."""
        jobs = close_quiet_studies(self.settings, actor=self.actor)
        if self.publisher is None:
            return jobs
        for job_id in jobs:
            try:
                self.publisher(job_id, JobKind.DICOM_STUDY.value)
            except Exception:
                log.exception("job %s committed but not published; the sweeper will", job_id)
        return jobs

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.dicom_completion_poll_s):
            try:
                self.check_completion()
            except Exception:
                log.exception("study completion check failed; retrying")
            if self._helpers is not None:
                try:
                    self._helpers.check()
                except Exception:
                    log.exception("could not restart a listener helper; retrying")

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Listen; with several listener processes, the primary also starts its helpers."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        processes = self.settings.dicom_listener_processes
        primary = self.publisher is not None
        address = (self.settings.dicom_bind_address, self.settings.dicom_port)
        if primary and processes > 1 and address[1]:
            # Helpers first: once this process listens too, every process takes associations.
            self._helpers = HelperPool(self.settings, address[1], processes - 1)
        try:
            server = self.ae.make_server(
                address,
                evt_handlers=handlers,
                ssl_context=build_ssl_context(self.settings),
                server_class=_ReusePortServer if self.reuse_port or processes > 1 else _Server,
            )
        except BaseException:
            if self._helpers is not None:
                self._helpers.stop()
                self._helpers = None
            raise
        self.store = InstanceStore(self.settings)
        _quiet(server)
        self.ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
        self._server = server
        threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
        if primary:  # study completion (and helpers, if the port was only known now)
            if processes > 1 and self._helpers is None:
                self._helpers = HelperPool(self.settings, self.port, processes - 1)
            self._watcher = threading.Thread(
                target=self._watch, name="study-completion", daemon=True
            )
            self._watcher.start()
        log.info(
            "DICOM listener %s on %s:%s (TLS %s, %d process(es))",
            self.settings.dicom_ae_title,
            address[0],
            self.port,
            "on" if self.settings.dicom_tls_cert else "off",
            processes if self.publisher is not None else 1,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._helpers is not None:
            self._helpers.stop()
            self._helpers = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._watcher is not None:
            self._watcher.join(timeout=10)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded acceptor."""


class _ReusePortServer(ThreadedAssociationServer):
    """The acceptor of one of several listener processes sharing the port (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


#: pynetdicom's own logging handlers, bound to every server and run for every PDU and DIMSE
#: message (8 % of the listener's Python time in a C-STORE) although their output goes nowhere:
#: the listener runs pynetdicom's logger at WARNING (its INFO lines name peers' objects).
_STANDARD_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _quiet(server: ThreadedAssociationServer) -> None:
    if logging.getLogger("pynetdicom").getEffectiveLevel() <= logging.INFO:
        return  # someone wants them
    for event, handler in _STANDARD_HANDLERS:
        if any(h == handler for h, _ in server.get_handlers(event)):  # type: ignore[misc]
            server.unbind(event, handler)
