"""Is medbatch able to work: each part it needs, named when it does not answer, how much work
waits in each queue, and, where ``medbatch up`` supervises the stack, what it knows about each
part (pid, up since, restarts, last exit). ``medbatch status`` and the API's ``/readyz`` both
show :func:`stack_status`.

Two sources: live probes done here and now (:mod:`medbatch.stack.probes`, the same ones the
supervisor uses) and the state file ``medbatch up`` rewrites on every change
(:mod:`medbatch.stack.state`; ``up`` runs in its own process). A part counts as answering only
on the probe's word; the state file says why it might not.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, computed_field

from core.errors import MedbatchError
from core.settings import Settings
from medbatch.stack import probes
from medbatch.stack.probes import Probe
from medbatch.stack.state import (
    HEARTBEAT_S,
    PartKind,
    PartPhase,
    StackState,
    read_state,
    state_path,
    utc_now,
)


class Supervision(StrEnum):
    RUNNING = "running"  # `medbatch up` is supervising now
    STOPPED = "stopped"  # it ended (see outcome)
    GONE = "gone"  # its process is not there, yet it did not say it stopped (killed?)
    STALE = "stale"  # on another host and silent for a while
    NONE = "none"  # `medbatch up` never ran with this storage_dir


class PartStatus(BaseModel):
    """One part: the live probe's answer, and what the supervisor recorded about it."""

    name: str
    kind: PartKind
    ok: bool  # answering now (the live probe)
    detail: str  # where it answers, or why not
    required: bool = True  # medbatch is not ready without it
    managed: bool | None = None  # started by `medbatch up`; false: external; None: unknown
    phase: PartPhase | None = None  # the supervisor's view, where one runs
    address: str = ""
    pid: int | None = None
    node: str | None = None  # a worker's Celery node name
    up_since: datetime | None = None
    restarts: int = 0
    last_exit: str | None = None
    last_exit_at: datetime | None = None


class StackStatus(BaseModel):
    checked_at: datetime
    supervision: Supervision
    supervisor_pid: int | None = None
    supervising_since: datetime | None = None
    stopped_at: datetime | None = None
    outcome: str | None = None  # why supervision ended ("stopped", or what gave up)
    state_file: str
    parts: list[PartStatus]
    queues: dict[str, int] = {}  # messages waiting, per queue
    notes: list[str] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ready(self) -> bool:
        """Every required part answers (what a load balancer's readiness check asks)."""
        return all(p.ok for p in self.parts if p.required)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failing(self) -> list[str]:
        return [p.name for p in self.parts if p.required and not p.ok]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def workers(self) -> list[str]:
        """Celery nodes that answered the ping."""
        return sorted(p.node for p in self.parts if p.kind is PartKind.WORKER and p.ok and p.node)

    @property
    def all_answering(self) -> bool:
        return all(p.ok for p in self.parts)


def _supervision(state: StackState | None, now: datetime) -> Supervision:
    if state is None:
        return Supervision.NONE
    if state.stopped_at is not None:
        return Supervision.STOPPED
    if state.host == socket.gethostname():
        try:
            os.kill(state.supervisor_pid, 0)
        except ProcessLookupError:
            return Supervision.GONE
        except PermissionError:
            pass  # alive, someone else's
        return Supervision.RUNNING
    if now - state.updated_at > timedelta(seconds=6 * HEARTBEAT_S):
        return Supervision.STALE
    return Supervision.RUNNING


def _queue_depths(settings: Settings) -> dict[str, int]:
    import redis

    from workers.celery_app import queues

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=2)
    return {q: int(client.llen(q)) for q in queues(settings)}


def stack_status(settings: Settings) -> StackStatus:
    """Probe every part now and merge in what a running ``medbatch up`` recorded about it."""
    now = utc_now()
    path = state_path(settings.storage_dir)
    notes: list[str] = []
    try:
        state = read_state(path)
    except MedbatchError as exc:
        state, notes = None, [str(exc)]
    supervision = _supervision(state, now)
    if supervision is Supervision.GONE:
        notes.append(
            f"medbatch up (pid {state.supervisor_pid if state else '?'}) is gone without having "
            "stopped its parts; what still runs is not supervised"
        )
    # The parts of an `up` that stopped are not shown: whatever answers now was started since.
    recorded = state.parts if state is not None and supervision is not Supervision.STOPPED else []

    redis_probe = probes.redis(settings)
    live: dict[PartKind, Probe] = {
        PartKind.DATABASE: probes.database(settings),
        PartKind.REDIS: redis_probe,
        PartKind.TRITON: probes.triton(settings),
        PartKind.LISTENER: probes.listener(settings),
        PartKind.API: probes.api(settings),
    }
    pings: dict[str, bool] = {}
    queues: dict[str, int] = {}
    if redis_probe.ok:
        try:
            pings = probes.worker_pings(settings.broker_url)
            queues = _queue_depths(settings)
        except Exception as exc:  # kombu/redis raise many kinds; a status check must not
            notes.append(f"could not ask Redis about the workers and queues: {exc}")
    else:
        notes.append("Redis does not answer, so the workers cannot be asked either")

    def required(kind: PartKind) -> bool:
        if kind is PartKind.LISTENER:  # a site that receives studies has an allow-list
            return bool(settings.dicom_allowed_aes or settings.dicom_allow_any_ae)
        return kind in (PartKind.DATABASE, PartKind.REDIS, PartKind.TRITON)

    parts = [_part("database", PartKind.DATABASE, live[PartKind.DATABASE], required=True)]
    if settings.storage_is_remote:  # shared by every host: none of them works without it
        parts.append(_part("storage", PartKind.STORAGE, probes.storage(settings), required=True))
    for p in recorded:
        if p.kind is PartKind.WORKER:
            answered = p.node is not None and pings.get(p.node, False)
            probe = Probe(answered, "answers a ping" if answered else "does not answer a ping")
        else:
            probe = live[p.kind]
        recorded_fields = p.model_dump(exclude={"name", "kind", "answering"})
        parts.append(_part(p.name, p.kind, probe, required=required(p.kind), **recorded_fields))
    # What no `up` runs: Redis and Triton always, the listener and the API where they answer
    # (or are required), every worker that answers the ping.
    shown = {p.kind for p in parts}
    for kind in (PartKind.REDIS, PartKind.TRITON, PartKind.LISTENER, PartKind.API):
        if kind not in shown and (live[kind].ok or required(kind)):
            parts.append(_part(kind.value, kind, live[kind], required=required(kind)))
    known = {p.node for p in parts if p.node}
    for node, answered in sorted(pings.items()):
        if node not in known:  # a worker started elsewhere (`medbatch worker`, another host)
            probe = Probe(answered, "answers a ping" if answered else "does not answer a ping")
            parts.append(_part(node, PartKind.WORKER, probe, required=False, node=node))
    if not any(p.kind is PartKind.WORKER for p in parts):
        probe = Probe(False, "no Celery worker answers a ping")
        parts.append(_part("workers", PartKind.WORKER, probe, required=False))

    return StackStatus(
        checked_at=now,
        supervision=supervision,
        supervisor_pid=state.supervisor_pid if state else None,
        supervising_since=state.started_at if state else None,
        stopped_at=state.stopped_at if state else None,
        outcome=state.outcome if state else None,
        state_file=str(path),
        parts=parts,
        queues=queues,
        notes=notes,
    )


def _part(
    name: str, kind: PartKind, probe: Probe, *, required: bool, **recorded: Any
) -> PartStatus:
    return PartStatus(
        name=name, kind=kind, ok=probe.ok, detail=probe.detail, required=required, **recorded
    )
