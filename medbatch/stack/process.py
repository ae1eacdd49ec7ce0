"""A supervised child process: started in its own process group, polled for readiness, stopped
with SIGTERM then SIGKILL. The base of the Redis, Triton and worker launchers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from core.errors import ServiceStartError


def native_tool(name: str) -> str | None:
    """The first compiled program ``name`` on PATH (DCMTK's tools, Orthanc, curl), passing over
    scripts of the same name: pynetdicom installs Python console scripts named like DCMTK's
    (``storescp``, ``storescu``, …) in every virtual environment that has it, and an activated
    one comes first on PATH."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(folder or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with contextlib.suppress(OSError), candidate.open("rb") as fh:
            if fh.read(4) == b"\x7fELF":
                return str(candidate)
    return None


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """One server or worker process that medbatch started and will stop."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: datetime | None = None  # wall clock, UTC
        self._group_reaped = False

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._group_reaped = False
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceStartError(f"{self.name}: cannot run {self.argv[0]}: {exc}") from exc
        finally:
            log.close()
        self.started_at = datetime.now(UTC)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; fail with the log's tail if the process dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceStartError(
                    f"{self.name} exited (code {self.proc.returncode if self.proc else '?'}) "
                    f"before {what}; its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.25)
        raise ServiceStartError(
            f"{self.name} not {what} after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def reap_group(self) -> None:
        """SIGKILL what is left of the process group once its leader has exited (a Celery pool
        child or a Triton backend stub outliving a killed parent).

        Call it right after the leader's exit was collected: the group keeps the leader's id
        while any member lives, and with no member left the id is free again, so a later call
        could hit a stranger's group. Hence once only."""
        if self.proc is None or self.proc.poll() is None or self._group_reaped:
            return
        self._group_reaped = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (graceful: Celery finishes or requeues), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return  # exited before: its group was reaped when that was noticed (reap_group)
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Reap any straggler in the group (pool children) so nothing outlives the stack.
        self.reap_group()

    def kill(self) -> None:
        """SIGKILL the whole group at once, as the OOM killer or a power cut would."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.reap_group()


def describe_exit(returncode: int | None) -> str:
    """An exit status as an operator reads it: 'killed by SIGKILL', 'exited with code 1'."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
