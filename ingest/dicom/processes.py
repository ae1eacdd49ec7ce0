"""Several listener processes on one port, so that associations use every core.

pynetdicom serves each association in Python threads of one process: however many associations
arrive, one process uses about one core. With ``MEDBATCH_DICOM_LISTENER_PROCESSES`` > 1 the
listener (the *primary*, which alone runs study completion) starts helper processes that bind
the same port with SO_REUSEPORT, and the kernel hands each new association to one of them.
Each helper has its own :class:`~ingest.dicom.store.InstanceStore` (and group-commit thread):
an instance is still answered only once stored, whichever process took it. Completion running in
the primary only keeps "one job per study version" trivially (the row lock in
:mod:`ingest.dicom.completion` guarantees it anyway, against the sweeper).

Helpers stay in the primary's process group (a SIGKILL of the group ends them all) and exit by
themselves when the primary goes away, even SIGKILLed alone; the primary restarts a helper that
dies.

    python -m ingest.dicom.helper_process --port P --parent PID [--ready-fd FD]  (by Listener)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys

from core.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the thread that started it goes away."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Helper:
    """One helper process started by the primary listener."""

    def __init__(self, settings: Settings, port: int, index: int) -> None:
        from core.settings import settings_env

        self.index = index
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ingest.dicom.helper_process",
                    "--port",
                    str(port),
                    "--parent",
                    str(os.getpid()),
                    "--ready-fd",
                    str(write_fd),
                ],
                env=settings_env(settings),
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(write_fd)
        self._ready_fd = read_fd

    def wait_ready(self, timeout: float) -> bool:
        """True once the helper listens (it writes a byte to the pipe)."""
        try:
            ready, _, _ = select.select([self._ready_fd], [], [], timeout)
            return bool(ready) and os.read(self._ready_fd, 1) == b"1"
        finally:
            os.close(self._ready_fd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HelperPool:
    """The primary's helpers: started, watched (a dead one is restarted), stopped."""

    def __init__(self, settings: Settings, port: int, count: int) -> None:
        self.settings = settings
        self.port = port
        self.helpers = [Helper(settings, port, i + 1) for i in range(count)]
        for h in self.helpers:
            if not h.wait_ready(60):
                log.warning("listener helper %d did not start listening within 60 s", h.index)

    def check(self) -> None:
        for i, h in enumerate(self.helpers):
            if not h.alive():
                log.warning(
                    "listener helper %d exited (%s); starting it again", h.index, h.proc.returncode
                )
                self.helpers[i] = Helper(self.settings, self.port, h.index)
                self.helpers[i].wait_ready(60)

    def stop(self) -> None:
        for h in self.helpers:
            if h.alive():
                h.proc.terminate()
        for h in self.helpers:
            h.stop()
