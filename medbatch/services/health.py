"""Is medbatch able to work: each part it needs, named when it does not answer, and how much
work waits in each queue."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from sqlalchemy import text

from core.settings import Settings
from db.session import read_scope


@dataclass(frozen=True)
class Component:
    name: str
    ok: bool
    detail: str
    required: bool = True


@dataclass(frozen=True)
class Readiness:
    components: list[Component]
    queues: dict[str, int] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.components if c.required)

    @property
    def failing(self) -> list[str]:
        return [c.name for c in self.components if c.required and not c.ok]


def _database(settings: Settings) -> Component:
    try:
        with read_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure is "does not answer", with its reason
        return Component("database", False, f"does not answer: {type(exc).__name__}")
    return Component("database", True, settings.database_url.split("://", 1)[0])


def _redis(settings: Settings) -> tuple[Component, dict[str, int]]:
    import redis

    from workers.celery_app import queues

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2)
        depths = {q: int(client.llen(q)) for q in queues(settings)}
    except redis.RedisError as exc:
        return Component("redis", False, f"does not answer at {settings.broker_url}: {exc}"), {}
    return Component("redis", True, settings.broker_url), depths


def _triton(settings: Settings) -> Component:
    from medbatch.stack.triton_server import is_ready

    if is_ready(settings):
        return Component("triton", True, settings.triton_http_url)
    return Component("triton", False, f"not ready at {settings.triton_http_url}")


def _listener(settings: Settings) -> Component:
    """Required where a PACS allow-list is configured (a site that receives studies)."""
    required = bool(settings.dicom_allowed_aes or settings.dicom_allow_any_ae)
    host = settings.dicom_bind_address
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with socket.create_connection((host, settings.dicom_port), timeout=2):
            pass
    except OSError as exc:
        detail = f"no DICOM listener at {host}:{settings.dicom_port} ({exc.strerror or exc})"
        return Component("listener", False, detail, required)
    return Component(
        "listener", True, f"{settings.dicom_ae_title} at {host}:{settings.dicom_port}", required
    )


def _workers() -> list[str]:
    from workers.celery_app import app

    try:
        return sorted((app.control.inspect(timeout=1.0).ping() or {}).keys())
    except Exception:  # a broker error is reported by the redis component
        return []


def readiness(settings: Settings) -> Readiness:
    """Probe the database, Redis (and the queue depths), Triton, the listener and the workers."""
    redis_component, depths = _redis(settings)
    workers = _workers() if redis_component.ok else []
    components = [
        _database(settings),
        redis_component,
        _triton(settings),
        _listener(settings),
        Component(
            "workers",
            bool(workers),
            f"{len(workers)} answering" if workers else "no Celery worker answers a ping",
            required=False,
        ),
    ]
    return Readiness(components, depths, workers)
