"""Starting and stopping medbatch's parts, and checking that what a submission needs answers."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from core.errors import MedbatchError

if TYPE_CHECKING:
    # The embedded stack's machinery (probes, process supervision, Alembic) is imported by
    # running_stack, redis by prepare_submission: a submission (`medbatch ehr FILE`, the API)
    # never loads the first, and importing this module loads neither.
    from core.settings import Settings
    from ingest.dicom.listener import Listener
    from medbatch.stack.embedded import EmbeddedStack, Reporter
    from workers.sweeper import SweepReport


def running_stack(
    settings: Settings,
    *,
    workers: int = 1,
    beat: bool = True,
    listener: bool = False,
    api: bool = False,
    report: Reporter | None = None,
) -> EmbeddedStack:
    """The embedded stack (Redis, Triton, workers, optionally the DICOM listener and the HTTP
    API) as a context manager: whatever is not already running is started, and stopped again
    on exit; its ``supervise(stop)`` restarts what exits until ``stop`` is set."""
    from medbatch.stack.embedded import EmbeddedStack

    return EmbeddedStack(
        settings, workers=workers, beat=beat, listener=listener, api=api, report=report
    )


_migrated: set[str] = set()
_migrating = threading.Lock()


def prepare_submission(settings: Settings) -> None:
    """What a submission needs before it stores anything: the schema migrated (once per
    process: Alembic is not thread-safe, and the API submits from several threads) and the
    broker answering (a job whose message cannot be published would wait for the sweeper)."""
    from medbatch.stack.redis_server import ping

    with _migrating:
        if settings.database_url not in _migrated:
            migrate(settings)
            _migrated.add(settings.database_url)
    if not ping(settings.broker_url):
        raise MedbatchError(
            f"Redis at {settings.broker_url} does not answer; start the stack with `medbatch up`"
        )


def queue_consumers(queue: str) -> list[str]:
    """Names of the workers consuming ``queue`` (asked over the broker, one second at most)."""
    from workers.celery_app import app as celery_app

    replies = celery_app.control.inspect(timeout=1.0).active_queues() or {}
    return [name for name, queues in replies.items() if any(q["name"] == queue for q in queues)]


def worker_command(
    settings: Settings, *, queues: list[str], concurrency: int, beat: bool, name: str
) -> list[str]:
    """The argv of a Celery worker on ``queues`` (all of them when empty); sets this process's
    PROMETHEUS_MULTIPROC_DIR so the pool children's metrics are gathered."""
    from medbatch.stack.worker_process import worker_argv
    from workers.celery_app import queues as all_queues

    qs = queues or all_queues(settings)
    node = name or f"medbatch-{'-'.join(qs)}@%h"
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = settings.storage_dir.resolve() / "prometheus" / node.split("@")[0]
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return worker_argv(
        qs,
        concurrency or settings.worker_concurrency,
        node,
        beat=beat,
        state_dir=settings.storage_dir,
    )


def triton_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of the Triton server from the nvidia-pytriton wheel."""
    from medbatch.stack.triton_server import server_env, triton_argv

    return triton_argv(settings, settings.storage_dir.resolve()), server_env()


def sweeper_age_s(settings: Settings) -> float:
    """Seconds since the sweeper last ran (infinite if never): beat's health."""
    import redis

    from workers.sweeper import HEARTBEAT_KEY

    last = redis.Redis.from_url(settings.broker_url).get(HEARTBEAT_KEY)
    return time.time() - float(last) if last else float("inf")


def migrate(settings: Settings, revision: str = "head") -> None:
    from db.migrate import upgrade

    upgrade(settings.database_url, revision)


def sweep_once(settings: Settings) -> SweepReport:
    """One sweeper pass now (beat runs it every ``sweep_interval_s``)."""
    from workers.sweeper import sweep

    return sweep(settings)


def start_listener(settings: Settings) -> Listener:
    """The DICOM listener, started in this process (C-ECHO, C-STORE; studies close after the
    quiet period)."""
    from db.migrate import upgrade
    from ingest.dicom.listener import Listener
    from workers.dispatch import publish

    upgrade(settings.database_url)
    listener = Listener(settings, publish)
    listener.start()
    return listener
