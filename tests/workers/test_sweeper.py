"""The sweeper reads job ids out of kombu's Redis messages, in a real private redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from core.job_kinds import JOB_KINDS, JobKind
from medbatch.stack.process import free_port
from medbatch.stack.redis_server import ping, redis_process
from tests.conftest import make_settings
from workers.celery_app import configure
from workers.sweeper import job_ids_in_broker

TASK_SCORE_CHUNK = JOB_KINDS[JobKind.CHEM_CHUNK].task


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = redis_process(url, tmp_path, persistent=False).start()
    try:
        proc.wait_until(lambda: ping(url), 20, "answering PING")
        yield url
    finally:
        proc.stop()


def test_ids_of_waiting_messages_are_found(private_redis: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, broker_url=private_redis)
    app = Celery("t")
    configure(app, settings)
    for job_id in (7, 42, 1001):
        app.send_task(TASK_SCORE_CHUNK, args=[job_id])
    app.send_task("medbatch.maintenance.sweep")  # no job id: ignored
    client = redis.Redis.from_url(private_redis)
    assert client.llen(settings.queue_chem) == 3
    assert job_ids_in_broker(client, [settings.queue_chem]) == {7, 42, 1001}
    client.delete(settings.queue_chem)
    assert job_ids_in_broker(client, [settings.queue_chem]) == set()


def test_unacked_messages_count_as_present(private_redis: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, broker_url=private_redis)
    app = Celery("t")
    configure(app, settings)
    app.send_task(TASK_SCORE_CHUNK, args=[5])
    client = redis.Redis.from_url(private_redis)
    raw = client.rpop(settings.queue_chem)
    assert raw is not None
    client.hset("unacked", "tag-1", b"[" + raw + b', "", "chem"]')  # as kombu holds it
    assert job_ids_in_broker(client, [settings.queue_chem]) == {5}
