"""The Celery application: Redis transport, at-least-once delivery, one queue per job kind.

At-least-once is the contract: a task is acknowledged only after its results are committed
(``task_acks_late``), a task whose worker died is redelivered (``task_reject_on_worker_lost`` for
a lost child, Redis' ``visibility_timeout`` for a lost host), and every task is idempotent, so a
redelivery stores nothing twice. Messages carry only job ids; the database holds the work.
"""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_process_init
from kombu import Queue

from core.job_kinds import JOB_KINDS
from core.settings import Settings, get_settings

#: Tasks that run no job (the job kinds' tasks are in ``core.job_kinds``).
TASK_SWEEP = "medbatch.maintenance.sweep"
TASK_EHR_SCAN = "medbatch.ehr.scan_drop_folder"


def cron(expression: str) -> crontab:
    """A 5-field cron expression (minute hour day-of-month month day-of-week) as a schedule."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron expression {expression!r} must have 5 fields: minute hour day month weekday"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


def beat_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    """The sweeper always; the EHR drop-folder scan when a drop folder is configured."""
    schedule: dict[str, dict[str, object]] = {
        "sweep-lost-jobs": {"task": TASK_SWEEP, "schedule": settings.sweep_interval_s},
    }
    if settings.ehr_drop_dir is not None:
        schedule["scan-ehr-drop-folder"] = {
            "task": TASK_EHR_SCAN,
            "schedule": cron(settings.ehr_drop_cron),
        }
    return schedule


def job_queues(settings: Settings) -> list[str]:
    """The queues jobs travel on (one per flow), in the job-kind table's order."""
    return list(dict.fromkeys(spec.queue(settings) for spec in JOB_KINDS.values()))


def queues(settings: Settings) -> list[str]:
    """Every queue a worker may consume: the flows' and the maintenance queue."""
    return [*job_queues(settings), settings.queue_maintenance]


def configure(app: Celery, settings: Settings) -> None:
    """Apply medbatch's delivery guarantees and routing to ``app``."""
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Scan for tasks whose worker vanished every interval (kombu's default throttle
            # would make that ten intervals), so redelivery follows the visibility timeout.
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=1000,
        worker_hijack_root_logger=False,
        task_ignore_result=True,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 30),
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_maintenance,
        task_queues=[Queue(q) for q in queues(settings)],
        task_routes={
            **{
                spec.task: {"queue": spec.queue(settings)}
                for spec in JOB_KINDS.values()
                if spec.task is not None
            },
            TASK_SWEEP: {"queue": settings.queue_maintenance},
            TASK_EHR_SCAN: {"queue": settings.queue_maintenance},
        },
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
        enable_utc=True,
    )


def reconfigure(app: Celery, settings: Settings) -> None:
    """Point an already-used app at other settings (tests, benchmarks with a private stack):
    configure it, then forget the pools of the previous broker. Celery caches them; kombu keeps
    them by URL, so they are dropped, not closed: going back to an earlier broker finds its pool
    intact."""
    configure(app, settings)
    if getattr(app, "_pool", None) is not None:
        app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


app = Celery(
    "medbatch",
    include=[
        "workers.chem.tasks",
        "workers.dicom.tasks",
        "workers.ehr.partition",
        "workers.ehr.tasks",
        "workers.ehr.dropfolder",
        "workers.sweeper",
        "workers.metrics",
    ],
)
configure(app, get_settings())


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """A forked pool child must not reuse the parent's database or Triton connections."""
    from db.session import dispose_all
    from workers.triton_client import reset_clients

    dispose_all()
    reset_clients()
