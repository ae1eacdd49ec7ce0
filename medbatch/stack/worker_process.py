"""Celery worker processes started by ``medbatch up`` and the test suite."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from core.settings import Settings, settings_env
from medbatch.stack.process import ManagedProcess


def use_settings(settings: Settings) -> None:
    """Make this process use ``settings`` too (tests and benchmarks that start a private stack):
    its environment, the cached settings, and the Celery app it publishes with."""
    from core.settings import get_settings
    from workers.celery_app import app, reconfigure

    os.environ.update(
        {k: v for k, v in settings_env(settings).items() if k.startswith("MEDBATCH_")}
    )
    get_settings.cache_clear()
    reconfigure(app, settings)


def worker_argv(
    queues: list[str], concurrency: int, name: str, *, beat: bool, state_dir: Path
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "-c",
        str(concurrency),
        "-n",
        name,
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv += ["-B", "-s", str(state_dir / "celerybeat-schedule")]
    return argv


def worker_process(
    settings: Settings,
    state_dir: Path,
    *,
    queues: list[str] | None = None,
    concurrency: int | None = None,
    beat: bool = False,
) -> ManagedProcess:
    queues = queues or [
        settings.queue_chem,
        settings.queue_dicom,
        settings.queue_ehr,
        settings.queue_maintenance,
    ]
    name = f"medbatch-{uuid.uuid4().hex[:8]}@%h"
    log = state_dir / "workers" / f"{name.split('@')[0]}.log"
    env = settings_env(settings)
    # prometheus-client's multiprocess mode: pool children write here, the main process serves.
    metrics_dir = state_dir / "workers" / f"{name.split('@')[0]}.prometheus"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return ManagedProcess(
        name,
        worker_argv(
            queues, concurrency or settings.worker_concurrency, name, beat=beat, state_dir=state_dir
        ),
        env,
        log,
    )


def worker_ready(process: ManagedProcess) -> bool:
    """A worker is ready once its log says so (Celery prints 'ready.' after connecting)."""
    try:
        return " ready." in process.log_path.read_text(errors="replace")
    except OSError:
        return False
