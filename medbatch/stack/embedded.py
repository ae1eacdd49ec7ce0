"""The embedded single-machine stack: Redis, Triton, Celery workers, optionally the DICOM listener
and the HTTP API, on loopback.

Each part is started only if it is not already answering (so ``medbatch up`` next to a running
Triton reuses it), and everything this stack started is stopped, in reverse order, on exit.
:meth:`EmbeddedStack.supervise` keeps them running in between (``medbatch up``); tests and demos
that kill parts on purpose do not call it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from functools import partial
from types import TracebackType

from core.errors import SupervisionError
from core.settings import Settings, settings_env
from db.migrate import upgrade
from medbatch.stack import probes, redis_server, triton_server
from medbatch.stack.probes import redacted_url
from medbatch.stack.process import ManagedProcess, port_open
from medbatch.stack.state import PartKind, state_path
from medbatch.stack.supervisor import (
    Part,
    RestartPolicy,
    SupervisionOutcome,
    Supervisor,
    db_audit_sink,
)
from medbatch.stack.worker_process import worker_process, worker_ready

log = logging.getLogger(__name__)

Reporter = Callable[[str], None]

REDIS_READY_TIMEOUT_S = 30.0
LISTENER_READY_TIMEOUT_S = 60.0
API_READY_TIMEOUT_S = 60.0


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
        self.workers: list[ManagedProcess] = []  # one per slot; a restart replaces in place
        self.metrics_ports: dict[str, int] = {}  # worker name → its /metrics port (0: none)
        self.triton: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.listener: ManagedProcess | None = None
        self.api: ManagedProcess | None = None
        # Answering already when the stack started: watched by supervise(), never restarted.
        self.triton_external = False
        self.api_external = False

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
            self.report(f"using the Redis already answering at {redacted_url(s.broker_url)}")
        else:
            self.start_redis_server()
            self.report(f"started a private redis-server at {redacted_url(s.broker_url)}")

        if self.start_triton:
            if triton_server.is_ready(s):
                self.triton_external = True
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
            if probes.api(s).ok:
                self.api_external = True
                self.report(f"using the HTTP API already answering at {s.api_url}/")
            elif port_open(*probes.api_address(s)):
                self.report(f"something else answers at {s.api_url}; not starting the API")
            else:
                self.start_api()
                self.report(f"HTTP API and console at {s.api_url}/")

    def add_worker(self, *, beat: bool = False, wait: bool = True) -> ManagedProcess:
        """Start one more worker process (also how a test replaces a killed worker)."""
        proc = self.launch_worker(len(self.workers), beat=beat)
        if wait:
            proc.wait_until(lambda: worker_ready(proc), self.ready_timeout_s, "ready")
        return proc

    def launch_worker(self, slot: int, *, beat: bool) -> ManagedProcess:
        """Start the worker of ``slot`` without waiting for it: a new slot (the next one) or in
        place of the dead worker there."""
        settings = self.settings
        if settings.metrics_port:  # one port per worker slot on this machine
            settings = settings.model_copy(update={"metrics_port": settings.metrics_port + slot})
        proc = worker_process(settings, self.state_dir, beat=beat).start()
        old = self.workers[slot] if slot < len(self.workers) else None
        if old is None:
            self.workers.append(proc)
        else:
            self.workers[slot] = proc
            self.metrics_ports.pop(old.name, None)
        self._register(old, proc)
        self.metrics_ports[proc.name] = settings.metrics_port
        return proc

    def start_redis_server(self) -> ManagedProcess:
        """(Re)start the private redis-server (its append-only file brings the queues back)."""
        proc = self.launch_redis()
        proc.wait_until(
            lambda: redis_server.ping(self.settings.broker_url),
            REDIS_READY_TIMEOUT_S,
            "answering PING",
        )
        return proc

    def launch_redis(self) -> ManagedProcess:
        old, self.redis = (
            self.redis,
            redis_server.redis_process(self.settings.broker_url, self.state_dir).start(),
        )
        self._register(old, self.redis)
        return self.redis

    def start_triton_server(self) -> ManagedProcess:
        """(Re)start the Triton server on the configured ports and wait until it is ready."""
        proc = self.launch_triton()
        proc.wait_until(
            lambda: triton_server.is_ready(self.settings), self.ready_timeout_s, "ready"
        )
        return proc

    def launch_triton(self) -> ManagedProcess:
        old, self.triton = (
            self.triton,
            triton_server.triton_process(self.settings, self.state_dir).start(),
        )
        self._register(old, self.triton)
        return self.triton

    def start_listener(self) -> ManagedProcess:
        """(Re)start ``medbatch listen`` and wait until its port accepts connections."""
        proc = self.launch_listener()
        proc.wait_until(
            lambda: probes.listener(self.settings).ok, LISTENER_READY_TIMEOUT_S, "listening"
        )
        return proc

    def launch_listener(self) -> ManagedProcess:
        old, self.listener = self.listener, self._cli_process("listener", "listen").start()
        self._register(old, self.listener)
        return self.listener

    def start_api(self) -> ManagedProcess:
        """(Re)start ``medbatch serve`` and wait until it answers /healthz."""
        proc = self.launch_api()
        proc.wait_until(lambda: probes.api(self.settings).ok, API_READY_TIMEOUT_S, "serving")
        return proc

    def launch_api(self) -> ManagedProcess:
        old, self.api = self.api, self._cli_process("api", "serve").start()
        self._register(old, self.api)
        return self.api

    def _cli_process(self, name: str, command: str) -> ManagedProcess:
        """A ``medbatch <command>`` child with this stack's settings, logging to ``<name>.log``."""
        argv = [sys.executable, "-m", "medbatch.cli", command]
        log_path = self.state_dir / f"{name}.log"
        return ManagedProcess(name, argv, settings_env(self.settings), log_path)

    def _register(self, old: ManagedProcess | None, new: ManagedProcess) -> None:
        """Track ``new`` for stop(), in the place of the process it replaces (stop order)."""
        if old is not None and old in self.started:
            self.started[self.started.index(old)] = new
        else:
            self.started.append(new)

    # --- supervision (``medbatch up``) ---------------------------------------------------------
    def parts(self) -> list[Part]:
        """Everything this stack runs or uses, each with its probe and (if ours) its launcher."""
        s = self.settings
        parts = [
            Part(
                "redis",
                PartKind.REDIS,
                partial(redis_server.ping, s.broker_url),
                launch=self.launch_redis if self.redis is not None else None,
                process=self.redis,
                ready_timeout_s=REDIS_READY_TIMEOUT_S,
                address=redacted_url(s.broker_url),
            )
        ]
        if self.triton is not None or self.triton_external:
            parts.append(
                Part(
                    "triton",
                    PartKind.TRITON,
                    partial(triton_server.is_ready, s),
                    launch=self.launch_triton if self.triton is not None else None,
                    process=self.triton,
                    ready_timeout_s=self.ready_timeout_s,
                    address=f"{s.triton_http_url} (gRPC {s.triton_grpc_url})",
                )
            )
        for slot, proc in enumerate(self.workers):
            beat = self.beat and slot == 0
            parts.append(
                Part(
                    f"worker-{slot}",
                    PartKind.WORKER,
                    partial(self._worker_answering, slot),
                    launch=partial(self.launch_worker, slot, beat=beat),
                    process=proc,
                    ready_timeout_s=self.ready_timeout_s,
                    address=f"queues {s.queue_chem}, {s.queue_dicom}, {s.queue_ehr}, "
                    f"{s.queue_maintenance}" + (" + beat" if beat else ""),
                )
            )
        if self.listener is not None:
            parts.append(
                Part(
                    "listener",
                    PartKind.LISTENER,
                    lambda: probes.listener(s).ok,
                    launch=self.launch_listener,
                    process=self.listener,
                    ready_timeout_s=LISTENER_READY_TIMEOUT_S,
                    address=f"{s.dicom_ae_title}@{s.dicom_bind_address}:{s.dicom_port}",
                )
            )
        if self.api is not None or self.api_external:
            parts.append(
                Part(
                    "api",
                    PartKind.API,
                    lambda: probes.api(s).ok,
                    launch=self.launch_api if self.api is not None else None,
                    process=self.api,
                    ready_timeout_s=API_READY_TIMEOUT_S,
                    address=s.api_url,
                )
            )
        return parts

    def _worker_answering(self, slot: int) -> bool:
        return worker_ready(self.workers[slot])

    def supervise(self, stop: threading.Event) -> SupervisionOutcome:
        """Keep every part running until ``stop`` is set (see :mod:`medbatch.stack.supervisor`).

        Raises :class:`SupervisionError` when a part exited more often than the restart budget
        allows; leaving the ``with`` block then stops the rest.
        """
        s = self.settings
        supervisor = Supervisor(
            self.parts(),
            RestartPolicy.from_settings(s),
            state_file=state_path(s.storage_dir),
            audit=db_audit_sink(s.database_url),
            poll_s=s.supervise_poll_s,
            probe_interval_s=s.supervise_probe_interval_s,
        )
        outcome = supervisor.run(stop)
        if outcome.gave_up is not None:
            raise SupervisionError(
                f"{outcome.reason} (MEDBATCH_SUPERVISE_RESTART_BUDGET="
                f"{s.supervise_restart_budget}): stopping everything. Its log: "
                f"{outcome.log_path or '-'}; `medbatch status` shows every part. Start again "
                "with `medbatch up` once the cause is fixed"
            )
        return outcome

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()
        self.workers.clear()
