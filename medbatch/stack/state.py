"""What ``medbatch up`` knows about its parts, in a JSON file under ``storage_dir`` that another
process (``medbatch status``, the HTTP API's /readyz) reads: ``up`` runs in its own process.

The supervisor rewrites the file atomically (a temporary file, then a rename), so a reader sees
the previous or the next state, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ValidationError

from core.errors import ConfigurationError

STATE_FILE = "stack-state.json"
HEARTBEAT_S = 5.0  # the file is rewritten at least this often (its updated_at)


class PartKind(StrEnum):
    DATABASE = "database"  # used, never started: shown by `medbatch status` and /readyz
    STORAGE = "storage"  # the object store (MEDBATCH_STORAGE_URL): used, never started
    REDIS = "redis"
    TRITON = "triton"
    WORKER = "worker"
    LISTENER = "listener"
    API = "api"


class PartPhase(StrEnum):
    """Where a part stands in the supervisor's eyes."""

    RUNNING = "running"  # started and answering
    STARTING = "starting"  # (re)started, not answering yet
    BACKOFF = "backoff"  # exited; waiting out the back-off before the restart
    FAILED = "failed"  # exited once more than the restart budget allows
    EXTERNAL = "external"  # not started by `medbatch up`: watched, never restarted
    STOPPED = "stopped"  # `medbatch up` stopped it on the way out


class PartState(BaseModel):
    """One process of the stack (or an outside service it uses), as the supervisor sees it."""

    name: str
    kind: PartKind
    managed: bool  # started (and restarted) by `medbatch up`; false: external, only watched
    phase: PartPhase
    address: str = ""  # where it answers (no credentials)
    pid: int | None = None
    node: str | None = None  # a worker's Celery node name
    up_since: datetime | None = None
    restarts: int = 0
    last_exit: str | None = None  # "killed by SIGKILL", "exited with code 1", "not ready after …"
    last_exit_at: datetime | None = None
    answering: bool | None = None  # at the supervisor's last look


class StackState(BaseModel):
    """The whole file: who supervises, since when, and every part."""

    supervisor_pid: int
    host: str
    started_at: datetime
    updated_at: datetime
    stopped_at: datetime | None = None
    outcome: str | None = None  # why supervision ended ("stopped", or what gave up)
    parts: list[PartState]


def utc_now() -> datetime:
    return datetime.now(UTC)


def state_path(storage_dir: Path) -> Path:
    return storage_dir.resolve() / STATE_FILE


def write_state(path: Path, state: StackState) -> None:
    """Replace the file atomically (rename within the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(state.model_dump_json(indent=2))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(path: Path) -> StackState | None:
    """The last state written, or None when ``medbatch up`` never ran with this storage_dir."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the stack state file {path}: {exc}") from exc
    try:
        return StackState.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigurationError(
            f"the stack state file {path} is not one this medbatch writes "
            f"({exc.error_count()} problems); it is rewritten by the next `medbatch up`"
        ) from exc
