"""Re-publish jobs whose message was lost (a Redis restart without persistence, a crash between
commit and publish). Redis is transport, not storage: the sweeper looks for every open job's id
in the broker (waiting lists and the un-acknowledged set) and re-sends the ones that are absent.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

import redis
from sqlalchemy import select, update

from core.job_kinds import LEAF_KINDS, JobKind
from core.settings import Settings, get_settings
from db import audit
from db.jobs import transition
from db.models import Job, JobState, utcnow
from db.session import session_scope
from ingest.dicom.completion import close_quiet_studies
from workers.celery_app import TASK_SWEEP, app, job_queues
from workers.dispatch import publish

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps priority sub-queues as "<queue>\x06\x16<n>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
HEARTBEAT_KEY = "medbatch:sweeper:last_run"


def _job_id_of(raw: bytes | str) -> int | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def job_ids_in_broker(client: redis.Redis, queues: list[str]) -> set[int]:
    """Ids of jobs whose message waits in a queue or is held, unacknowledged, by a worker."""
    found: set[int] = set()
    for queue in queues:
        for suffix in _PRIORITY_SUFFIXES:
            for raw in client.lrange(queue + suffix, 0, -1):
                if (job_id := _job_id_of(raw)) is not None:
                    found.add(job_id)
    for raw in client.hvals("unacked"):
        if (job_id := _job_id_of(raw)) is not None:
            found.add(job_id)
    return found


@dataclass
class SweepReport:
    republished: list[int] = field(default_factory=list)
    failed_ingests: list[int] = field(default_factory=list)
    studies_closed: list[int] = field(default_factory=list)


def sweep(settings: Settings | None = None) -> SweepReport:
    """One pass: close quiet DICOM studies, re-publish open jobs missing from the broker, fail
    abandoned ingests."""
    settings = settings or get_settings()
    report = SweepReport()
    actor = audit.current_actor("sweeper")
    client = redis.Redis.from_url(settings.broker_url)
    for job_id in close_quiet_studies(settings, actor=actor):  # when no listener is running
        publish(job_id, JobKind.DICOM_STUDY.value)
        report.studies_closed.append(job_id)
    present = job_ids_in_broker(client, job_queues(settings))
    cutoff = utcnow() - timedelta(seconds=settings.sweep_grace_s)
    open_states = [JobState.RECEIVED.value, JobState.QUEUED.value, JobState.RUNNING.value]
    with session_scope(settings.database_url) as session:
        candidates = session.execute(
            select(Job.id, Job.kind, Job.state).where(
                Job.kind.in_(sorted(LEAF_KINDS)),
                Job.state.in_(open_states),
                Job.updated_at < cutoff,
            )
        ).all()
    for job_id, kind, state in candidates:
        if job_id in present:
            continue
        with session_scope(settings.database_url) as session:
            if state == JobState.RECEIVED.value:
                transition(session, job_id, JobState.QUEUED, actor=actor)
            else:
                session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
            audit.append(
                session,
                actor=actor,
                action="job.republished",
                subject=f"job:{job_id}",
                details={"state": state, "reason": "message absent from the broker"},
            )
        publish(job_id, kind)
        report.republished.append(job_id)
    stale = utcnow() - timedelta(seconds=max(settings.sweep_grace_s, settings.visibility_timeout_s))
    with session_scope(settings.database_url) as session:
        abandoned = session.scalars(
            select(Job.id).where(
                Job.kind == JobKind.CHEM_SCREEN.value,
                Job.state == JobState.RECEIVED.value,
                Job.updated_at < stale,
            )
        ).all()
        for job_id in abandoned:
            if transition(
                session,
                job_id,
                JobState.FAILED,
                actor=actor,
                error="ingest stopped before the whole file was read; submit the file again "
                "(rows already stored are reused)",
            ):
                report.failed_ingests.append(job_id)
    client.set(HEARTBEAT_KEY, str(time.time()))
    if report.republished or report.failed_ingests or report.studies_closed:
        log.warning(
            "sweeper re-published %d jobs, failed %d abandoned ingests",
            len(report.republished),
            len(report.failed_ingests),
        )
    return report


@app.task(name=TASK_SWEEP)
def sweep_task() -> dict[str, list[int]]:
    report = sweep()
    return {
        "republished": report.republished,
        "failed_ingests": report.failed_ingests,
        "studies_closed": report.studies_closed,
    }
