"""The embedded single-machine stack: Redis, Triton and Celery workers on loopback.

Each part is started only if it is not already answering (so ``medbatch up`` next to a running
Triton reuses it), and everything this stack started is stopped, in reverse order, on exit.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import partial
from types import TracebackType

from core.settings import Settings, settings_env
from db.migrate import upgrade
from medbatch.stack import redis_server, triton_server
from medbatch.stack.process import ManagedProcess, port_open
from medbatch.stack.worker_process import worker_process, worker_ready

log = logging.getLogger(__name__)

Reporter = Callable[[str], None]


class EmbeddedStack:
    """Context manager: ``with EmbeddedStack(settings) as stack: ...``."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 1,
        beat: bool = True,
        start_triton: bool = True,
        listener: bool = False,
        api: bool = False,
        report: Reporter | None = None,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.settings = settings
        self.state_dir = settings.storage_dir.resolve()
        self.n_workers = workers
        self.beat = beat
        self.start_triton = start_triton
        self.start_listener_too = listener
        self.start_api_too = api
        self.report = report or log.info
        self.ready_timeout_s = ready_timeout_s
        self.started: list[ManagedProcess] = []
        self.workers: list[ManagedProcess] = []
        self.metrics_ports: dict[str, int] = {}  # worker name → its /metrics port (0: none)
        self.triton: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.listener: ManagedProcess | None = None
        self.api: ManagedProcess | None = None

    def __enter__(self) -> EmbeddedStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        s = self.settings
        self.state_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.database_url)
        self.report(f"database ready ({s.database_url.split('://', 1)[0]})")

        if redis_server.ping(s.broker_url):
            self.report(f"using the Redis already answering at {s.broker_url}")
        else:
            self.start_redis_server()
            self.report(f"started a private redis-server at {s.broker_url}")

        if self.start_triton:
            if triton_server.is_ready(s):
                self.report(f"using the Triton already ready at {s.triton_http_url}")
            else:
                self.start_triton_server()
                self.report(f"started tritonserver (gRPC {s.triton_grpc_url})")

        for i in range(self.n_workers):
            self.add_worker(beat=self.beat and i == 0, wait=False)
        for proc in self.workers:
            proc.wait_until(partial(worker_ready, proc), self.ready_timeout_s, "ready")
        self.report(
            f"{self.n_workers} Celery worker(s) ready on queues chem, dicom, ehr, maintenance"
        )
        if self.start_listener_too:
            self.start_listener()
            self.report(
                f"DICOM listener {s.dicom_ae_title} on {s.dicom_bind_address}:{s.dicom_port}"
            )
        if self.start_api_too:
            host = (
                "127.0.0.1" if s.api_bind_address in ("0.0.0.0", "", "::") else s.api_bind_address
            )
            if port_open(host, s.api_port):
                self.report(f"something already answers at {s.api_url}; not starting the API")
            else:
                self.start_api()
                self.report(f"HTTP API and console at {s.api_url}/")

    def add_worker(self, *, beat: bool = False, wait: bool = True) -> ManagedProcess:
        """Start one more worker process (also how a killed worker is replaced)."""
        settings = self.settings
        if settings.metrics_port:  # one port per worker process on this machine
            settings = settings.model_copy(
                update={"metrics_port": settings.metrics_port + len(self.workers)}
            )
        proc = worker_process(settings, self.state_dir, beat=beat).start()
        self.started.append(proc)
        self.workers.append(proc)
        self.metrics_ports[proc.name] = settings.metrics_port
        if wait:
            proc.wait_until(lambda: worker_ready(proc), self.ready_timeout_s, "ready")
        return proc

    def start_redis_server(self) -> ManagedProcess:
        """(Re)start the private redis-server (its append-only file brings the queues back)."""
        s = self.settings
        self.redis = redis_server.redis_process(s.broker_url, self.state_dir).start()
        self.started.append(self.redis)
        self.redis.wait_until(lambda: redis_server.ping(s.broker_url), 30, "answering PING")
        return self.redis

    def start_triton_server(self) -> ManagedProcess:
        """(Re)start the Triton server on the configured ports and wait until it is ready."""
        s = self.settings
        self.triton = triton_server.triton_process(s, self.state_dir).start()
        self.started.append(self.triton)
        self.triton.wait_until(lambda: triton_server.is_ready(s), self.ready_timeout_s, "ready")
        return self.triton

    def start_listener(self) -> ManagedProcess:
        """(Re)start ``medbatch listen`` and wait until its port accepts connections."""
        s = self.settings
        argv = [sys.executable, "-m", "medbatch.cli", "listen"]
        log_path = self.state_dir / "listener.log"
        self.listener = ManagedProcess("listener", argv, settings_env(s), log_path).start()
        self.started.append(self.listener)
        host = "127.0.0.1" if s.dicom_bind_address in ("0.0.0.0", "") else s.dicom_bind_address
        self.listener.wait_until(lambda: port_open(host, s.dicom_port), 60, "listening")
        return self.listener

    def start_api(self) -> ManagedProcess:
        """(Re)start ``medbatch serve`` and wait until it answers /healthz."""
        s = self.settings
        argv = [sys.executable, "-m", "medbatch.cli", "serve"]
        log_path = self.state_dir / "api.log"
        self.api = ManagedProcess("api", argv, settings_env(s), log_path).start()
        self.started.append(self.api)
        host = "127.0.0.1" if s.api_bind_address in ("0.0.0.0", "", "::") else s.api_bind_address
        self.api.wait_until(lambda: port_open(host, s.api_port), 60, "serving")
        return self.api

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()
        self.workers.clear()
