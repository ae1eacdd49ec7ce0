"""Every probe of a part of medbatch, once: does the database, Redis, Triton, a worker, the DICOM
listener, the HTTP API answer right now? The supervisor of ``medbatch up`` (is a restarted part
back?), ``medbatch status`` and the API's ``/readyz`` all ask these, so they cannot disagree.

Each probe is quick (a second or two at most) and says why not, without credentials.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from sqlalchemy import text

from core.settings import Settings, local_host
from db.session import read_scope
from medbatch.stack import redis_server, triton_server
from medbatch.stack.process import port_open

TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str  # where it answers, or why it does not


def redacted_url(url: str) -> str:
    """A URL without its password, for logs, the state file and status answers."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username or ''}:***@{parsed.hostname}"
    if parsed.port:
        netloc += f":{parsed.port}"
    return parsed._replace(netloc=netloc).geturl()


def database(settings: Settings) -> Probe:
    try:
        with read_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure is "does not answer", with its kind
        return Probe(False, f"does not answer: {type(exc).__name__}")
    return Probe(True, settings.database_url.split("://", 1)[0])


def storage(settings: Settings) -> Probe:
    """Does the object store answer (a lookup of one key; local storage: the folder exists)?"""
    from core.errors import MedbatchError
    from core.storage import storage_for

    try:
        store = storage_for(settings)
        if store.is_local:
            ok = settings.objects_dir.is_dir()
            return Probe(ok, str(settings.objects_dir) if ok else "the folder does not exist")
        store.exists(".medbatch-probe")
    except MedbatchError as exc:
        return Probe(False, str(exc).split(";")[0][:200])
    return Probe(True, store.url)


def redis(settings: Settings) -> Probe:
    at = redacted_url(settings.broker_url)
    if redis_server.ping(settings.broker_url):
        return Probe(True, at)
    return Probe(False, f"does not answer PING at {at}")


def triton(settings: Settings) -> Probe:
    if triton_server.is_ready(settings, timeout=TIMEOUT_S):
        return Probe(True, f"{settings.triton_http_url} (gRPC {settings.triton_grpc_url})")
    return Probe(False, f"not ready at {settings.triton_http_url}")


def listener_address(settings: Settings) -> tuple[str, int]:
    return local_host(settings.dicom_bind_address), settings.dicom_port


def listener(settings: Settings) -> Probe:
    """The DICOM listener accepts connections (an association is more than a status needs)."""
    host, port = listener_address(settings)
    if port_open(host, port, timeout=TIMEOUT_S):
        return Probe(True, f"{settings.dicom_ae_title} at {host}:{port}")
    return Probe(False, f"no DICOM listener at {host}:{port}")


def api_address(settings: Settings) -> tuple[str, int]:
    return local_host(settings.api_bind_address), settings.api_port


def api(settings: Settings) -> Probe:
    """``GET /healthz`` of ``medbatch serve`` (no token needed) answers 200."""
    scheme = "https" if settings.api_tls_cert else "http"
    host, port = api_address(settings)
    url = f"{scheme}://{host}:{port}/healthz"
    context = None
    if scheme == "https":  # a local liveness check: the certificate names the public host
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as r:
            if r.status == 200:
                return Probe(True, settings.api_url)
            return Probe(False, f"{url} answered {r.status}")
    except urllib.error.HTTPError as exc:
        return Probe(False, f"{url} answered {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return Probe(False, f"no API at {url} ({getattr(exc, 'reason', exc)})")


def worker_pings(broker_url: str, timeout: float = TIMEOUT_S) -> dict[str, bool]:
    """Celery node name → answered ``ping`` over the broker's remote-control channel (ask only
    when Redis answers: a broker that is down makes kombu retry)."""
    from celery import Celery  # here: the CLI starts without loading Celery

    app = Celery("medbatch-probe", broker=broker_url, set_as_current=False)
    try:
        replies = app.control.ping(timeout=timeout) or []
    finally:
        app.close()
    return {
        node: isinstance(answer, dict) and answer.get("ok") == "pong"
        for reply in replies
        for node, answer in reply.items()
    }
