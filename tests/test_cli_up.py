"""`medbatch up` as a user runs it: a real process that starts Redis, Triton and a worker, reports
ready, and on SIGTERM stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.settings import settings_env
from medbatch.stack.process import port_open
from medbatch.stack.redis_server import host_port, ping
from tests.conftest import make_settings

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_up_starts_everything_and_stops_it_cleanly(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    env = settings_env(settings)
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "medbatch"), "up"],  # the installed command
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "medbatch is up" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "not up after 240 s"
            time.sleep(0.5)
        assert ping(settings.broker_url)
        assert port_open(settings.triton_host, settings.triton_grpc_port)
        assert list((tmp_path / "workers").glob("*.log"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    host, port = host_port(settings.broker_url)
    assert not port_open(host, port), "redis-server left running"
    assert not port_open(settings.triton_host, settings.triton_grpc_port), (
        "tritonserver left running"
    )
