"""The append-only, hash-chained audit log.

Each event's hash is ``sha256(prev_hash + canonical JSON of the event)``, so altering, deleting or
inserting any row breaks every later link; :func:`verify_chain` names the first broken one.
Events are written in the same transaction as the change they describe: a state change without
its audit event cannot be committed.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Integer,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from core.errors import AuditChainError
from db.models import AuditEvent, AuditHead, utcnow

GENESIS_HASH = "0" * 64


def ts_text(ts: datetime) -> str:
    """A timestamp's canonical text; SQLite returns naive UTC, PostgreSQL aware — same text."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(
    prev_hash: str,
    seq: int,
    ts: datetime,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any],
) -> str:
    body = json.dumps(
        [seq, ts_text(ts), actor, action, subject, details],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def subject_digest(identifier: str, salt: str = "medbatch") -> str:
    """A stable pseudonym for a patient identifier, for subjects and logs (never the raw value)."""
    return "sha256:" + hashlib.sha256(f"{salt}:{identifier}".encode()).hexdigest()[:32]


def current_actor(role: str = "user") -> str:
    """Who is acting: ``user:<login>@<host>`` for the CLI, ``worker:<host>:<pid>`` for workers."""
    host = socket.gethostname()
    if role == "worker":
        return f"worker:{host}:{os.getpid()}"
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = f"uid{os.getuid()}"
    return f"{role}:{login}@{host}"


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
) -> int:
    """Append one event inside the caller's transaction; returns its sequence number."""
    details = details or {}
    # Take the chain head's row lock first (UPDATE), then read it: concurrent appenders queue here.
    bumped: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1)
    )
    if bumped.rowcount == 0:
        raise AuditChainError(
            "the audit chain has no head row; the database was not created by `medbatch db upgrade`"
        )
    head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
    seq, prev = int(head.seq), str(head.hash)
    ts = utcnow()
    digest = event_hash(prev, seq, ts, actor, action, subject, details)
    session.execute(
        insert(AuditEvent).values(
            seq=seq,
            ts=ts,
            actor=actor,
            action=action,
            subject=subject,
            details=details,
            prev_hash=prev,
            hash=digest,
        )
    )
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=digest))
    return seq


@dataclass(frozen=True)
class EventRecord:
    """One event for :func:`append_many`."""

    actor: str
    action: str
    subject: str
    details: dict[str, Any]


_HEAD = cast(Table, AuditHead.__table__)
_EVENTS = cast(Table, AuditEvent.__table__)
_BUMP_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == 1)
    .values(seq=_HEAD.c.seq + bindparam("n", type_=Integer))
    .returning(_HEAD.c.seq, _HEAD.c.hash)
)
_SET_HEAD_HASH = update(_HEAD).where(_HEAD.c.id == 1).values(hash=bindparam("hash"))
_INSERT_EVENTS = insert(_EVENTS)


def append_many(db: Session | Connection, events: Sequence[EventRecord]) -> list[int]:
    """Append ``events`` in order inside the caller's transaction, taking the chain head once.

    The same links as :func:`append` for each event, in three statements whatever their number
    (Core statements built once: this is on the DICOM listener's commit path).
    """
    if not events:
        return []
    # Bump and read the head in one statement (RETURNING: PostgreSQL, SQLite >= 3.35).
    head = db.execute(_BUMP_HEAD, {"n": len(events)}).first()
    if head is None:
        raise AuditChainError(
            "the audit chain has no head row; the database was not created by `medbatch db upgrade`"
        )
    seq, prev = int(head.seq) - len(events), str(head.hash)
    ts = utcnow()
    rows = []
    for ev in events:
        seq += 1
        digest = event_hash(prev, seq, ts, ev.actor, ev.action, ev.subject, ev.details)
        rows.append(
            {
                "seq": seq,
                "ts": ts,
                "actor": ev.actor,
                "action": ev.action,
                "subject": ev.subject,
                "details": ev.details,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    db.execute(_INSERT_EVENTS, rows)
    db.execute(_SET_HEAD_HASH, {"hash": prev})
    return [int(str(r["seq"])) for r in rows]


@dataclass(frozen=True)
class ChainReport:
    """Outcome of :func:`verify_chain`: ``ok`` or the first broken link and why."""

    events: int
    ok: bool
    broken_seq: int | None = None
    reason: str = ""


def _events(session: Session, batch: int = 5000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


def verify_chain(session: Session) -> ChainReport:
    """Walk the whole chain in order; stop at the first link that does not hold."""
    prev, expected_seq, count = GENESIS_HASH, 1, 0
    for ev in _events(session):
        if ev.seq != expected_seq:
            return ChainReport(count, False, expected_seq, f"event {expected_seq} is missing")
        if ev.prev_hash != prev:
            return ChainReport(count, False, ev.seq, "prev_hash does not match the event before")
        recomputed = event_hash(
            prev, ev.seq, ev.ts, ev.actor, ev.action, ev.subject, dict(ev.details)
        )
        if recomputed != ev.hash:
            return ChainReport(count, False, ev.seq, "content does not match its hash (altered)")
        prev, expected_seq, count = ev.hash, expected_seq + 1, count + 1
    head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).first()
    if head is not None and (int(head.seq) != count or head.hash != prev):
        return ChainReport(
            count,
            False,
            count + 1 if int(head.seq) > count else count,
            f"chain head says {head.seq} events, the table holds {count} "
            "(rows removed at the end?)",
        )
    return ChainReport(count, True)
