"""The listener over TLS: a client that trusts our certificate stores an instance; a plain-TCP
client gets no association. Runs the listener in-process on its own SQLite database."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from core.settings import Settings
from db.migrate import upgrade
from db.models import DicomInstance
from db.session import session_scope
from ingest.dicom.listener import Listener
from medbatch.stack.process import free_port
from tests.dicom_data import make_series

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def tls_listener(tmp_path: Path) -> Iterator[tuple[Listener, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    settings = Settings(  # type: ignore[call-arg]
        storage_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'tls.db'}",
        dicom_port=free_port(),
        dicom_allowed_aes="TLS_CLIENT",
        dicom_tls_cert=cert,
        dicom_tls_key=key,
    )
    upgrade(settings.database_url)
    published: list[int] = []
    listener = Listener(settings, lambda job_id, kind: published.append(job_id))
    listener.start()
    try:
        yield listener, cert
    finally:
        listener.stop()


def _ae() -> AE:
    ae = AE(ae_title="TLS_CLIENT")
    ae.add_requested_context(CT)
    ae.acse_timeout = ae.network_timeout = 10
    return ae


def test_tls_association_stores_and_plain_tcp_is_refused(
    tls_listener: tuple[Listener, Path], tmp_path: Path
) -> None:
    listener, cert = tls_listener
    s = listener.settings
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assoc = _ae().associate(
        "127.0.0.1", listener.port, ae_title=s.dicom_ae_title, tls_args=(client_ctx, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        ds = pydicom.dcmread(make_series(tmp_path / "s", 1)[0])
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    with session_scope(s.database_url) as session:
        assert session.scalar(select(func.count()).select_from(DicomInstance)) == 1

    plain = _ae().associate("127.0.0.1", listener.port, ae_title=s.dicom_ae_title)
    assert not plain.is_established
