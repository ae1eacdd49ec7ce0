"""Supervision of the processes ``medbatch up`` started: a process that exits is restarted after
an exponential back-off; one that exits more often than the restart budget allows within the
window makes supervision give up, so that ``up`` stops everything and exits non-zero and an
outer supervisor (systemd) notices. A service ``up`` did not start (a Redis, Triton or API that
answered already) is probed and reported, never restarted.

Every exit, restart and give-up is logged and audited; the state of every part is written to the
state file (:mod:`medbatch.stack.state`) for ``medbatch status`` and the API's ``/readyz``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from core.errors import MedbatchError
from core.settings import Settings
from medbatch.stack.process import ManagedProcess, describe_exit
from medbatch.stack.state import (
    HEARTBEAT_S,
    PartKind,
    PartPhase,
    PartState,
    StackState,
    utc_now,
    write_state,
)

log = logging.getLogger(__name__)

#: (action, subject, details) → one audit event.
AuditSink = Callable[[str, str, dict[str, Any]], None]


# --- the policy: pure, so it is tested without processes --------------------------------------
@dataclass(frozen=True)
class RestartDecision:
    give_up: bool
    delay_s: float  # wait this long before the restart (0 when giving up)
    recent: int  # restarts of this process already inside the window


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off over the restarts within a sliding window, and a budget for them.

    The n-th restart inside the window waits ``base · 2^(n-1)`` seconds (at most ``max``); once
    ``budget`` restarts lie inside the window, the next exit gives up. Restarts age out of the
    window, so a process that crashes once a day is restarted every time, after ``base``.
    """

    base_s: float
    max_s: float
    budget: int
    window_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(
            base_s=settings.supervise_backoff_base_s,
            max_s=settings.supervise_backoff_max_s,
            budget=settings.supervise_restart_budget,
            window_s=settings.supervise_restart_window_s,
        )

    def recent(self, history: Sequence[float], now: float) -> int:
        """Restarts (monotonic times in ``history``) that lie inside the window ending now."""
        return sum(1 for t in history if now - t < self.window_s)

    def decide(self, history: Sequence[float], now: float) -> RestartDecision:
        """What to do about a process that exited at ``now`` after the restarts in ``history``."""
        n = self.recent(history, now)
        if n >= self.budget:
            return RestartDecision(give_up=True, delay_s=0.0, recent=n)
        return RestartDecision(
            give_up=False, delay_s=min(self.base_s * 2.0**n, self.max_s), recent=n
        )


# --- the parts --------------------------------------------------------------------------------
@dataclass
class Part:
    """One thing the stack runs. ``launch`` (re)starts it without waiting; None: not ours."""

    name: str
    kind: PartKind
    probe: Callable[[], bool]  # answering (ready) right now?
    launch: Callable[[], ManagedProcess] | None = None
    process: ManagedProcess | None = None
    ready_timeout_s: float = 60.0
    address: str = ""

    @property
    def managed(self) -> bool:
        return self.launch is not None

    @property
    def node(self) -> str | None:
        """A worker's Celery node name as the worker itself reports it (``%h`` expanded)."""
        if self.kind is not PartKind.WORKER or self.process is None:
            return None
        return self.process.name.replace("%h", socket.gethostname())


@dataclass
class _Watch:
    """The supervisor's bookkeeping for one part."""

    phase: PartPhase
    up_since: datetime | None
    answering: bool | None
    restarts: int = 0
    history: list[float] = field(default_factory=list)  # monotonic times of restarts
    last_exit: str | None = None
    last_exit_at: datetime | None = None
    next_start: float = 0.0
    deadline: float = 0.0
    next_probe: float = 0.0


@dataclass(frozen=True)
class SupervisionOutcome:
    """How supervision ended: asked to stop, or ``gave_up`` on that part for ``reason``."""

    gave_up: str | None = None
    reason: str = "stopped"
    log_path: Path | None = None  # the log of the part that gave up


def db_audit_sink(database_url: str) -> AuditSink:
    """Audit events from the supervisor, each in its own transaction; a database that is down
    must not stop the supervision (the event is logged instead)."""
    from db import audit
    from db.session import session_scope

    actor = audit.current_actor("supervisor")

    def sink(action: str, subject: str, details: dict[str, Any]) -> None:
        try:
            with session_scope(database_url) as session:
                audit.append(session, actor=actor, action=action, subject=subject, details=details)
        except (SQLAlchemyError, MedbatchError, OSError) as exc:
            log.error("could not audit %s of %s (%s): %s", action, subject, details, exc)

    return sink


class Supervisor:
    """Watches ``parts`` until ``stop`` is set or a part exhausts its restart budget."""

    def __init__(
        self,
        parts: list[Part],
        policy: RestartPolicy,
        *,
        state_file: Path | None = None,
        audit: AuditSink | None = None,
        poll_s: float = 0.5,
        probe_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.parts = parts
        self.policy = policy
        self.state_file = state_file
        self.audit = audit or (lambda action, subject, details: None)
        self.poll_s = poll_s
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.started_at = utc_now()
        self.watch: dict[str, _Watch] = {
            p.name: _Watch(
                phase=PartPhase.RUNNING if p.managed else PartPhase.EXTERNAL,
                # ours: since its process started; external: since we found it answering
                up_since=(p.process.started_at if p.process else None) or self.started_at,
                answering=True,  # the stack started it, or found it answering, just now
            )
            for p in parts
        }
        self._dirty = True
        self._last_write = float("-inf")
        self._write_failed = False

    # --- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> SupervisionOutcome:
        """Supervise until ``stop`` is set (SIGTERM, Ctrl-C) or a part gives up."""
        self.audit(
            "stack.supervision_started",
            "stack",
            {"parts": [p.name for p in self.parts if p.managed], "watched": self.external_names()},
        )
        outcome = SupervisionOutcome()
        try:
            while not stop.is_set():
                failed = self.tick()
                if failed is not None:
                    w = self.watch[failed.name]
                    reason = (
                        f"{failed.name} {w.last_exit}, after {w.restarts} restarts within "
                        f"{self.policy.window_s:.0f} s"
                    )
                    log_path = failed.process.log_path if failed.process else None
                    outcome = SupervisionOutcome(failed.name, reason, log_path)
                    break
                self._write_state_if_due()
                stop.wait(self.poll_s)
        finally:
            for w in self.watch.values():
                if w.phase in (PartPhase.RUNNING, PartPhase.STARTING, PartPhase.BACKOFF):
                    w.phase, w.up_since = PartPhase.STOPPED, None
            self._write_state(outcome=outcome.reason, stopped=True)
            self.audit(
                "stack.supervision_ended",
                "stack",
                {"outcome": outcome.reason, "restarts": self.restart_counts()},
            )
        return outcome

    def tick(self) -> Part | None:
        """One look at every part; returns the part that gave up, if one did."""
        now = self.clock()
        for part in self.parts:
            w = self.watch[part.name]
            if not part.managed:
                self._probe_external(part, w, now)
            elif w.phase in (PartPhase.RUNNING, PartPhase.STARTING):
                if self._check_process(part, w, now):
                    return part
            elif (
                w.phase is PartPhase.BACKOFF and now >= w.next_start and self._restart(part, w, now)
            ):
                return part
        return None

    def _check_process(self, part: Part, w: _Watch, now: float) -> bool:
        proc = part.process
        if proc is None or not proc.alive():
            if proc is not None:
                proc.reap_group()  # pool children, backend stubs: nothing of it may linger
            reason = describe_exit(proc.returncode if proc else None)
            if w.phase is PartPhase.STARTING:
                reason += " while starting"
            return self._exited(part, w, reason, now)
        if w.phase is PartPhase.STARTING:
            if part.probe():
                w.phase, w.answering = PartPhase.RUNNING, True
                self._dirty = True
                log.warning("%s is back (pid %s) after restart %d", part.name, proc.pid, w.restarts)
                self.audit(
                    "stack.process_restarted",
                    f"process:{part.name}",
                    {"pid": proc.pid, "restarts": w.restarts, "node": part.node},
                )
            elif now >= w.deadline:
                proc.kill()
                reason = f"not answering {part.ready_timeout_s:.0f} s after its restart"
                return self._exited(part, w, reason, now)
        return False

    def _restart(self, part: Part, w: _Watch, now: float) -> bool:
        assert part.launch is not None
        try:
            part.process = part.launch()
        except MedbatchError as exc:
            return self._exited(part, w, f"could not be started: {exc}", now)
        w.phase, w.deadline = PartPhase.STARTING, now + part.ready_timeout_s
        w.up_since = part.process.started_at
        self._dirty = True
        log.info("%s restarted (pid %s); waiting until it answers", part.name, part.process.pid)
        return False

    def _exited(self, part: Part, w: _Watch, reason: str, now: float) -> bool:
        """Record an exit; schedule the restart, or give up (returns True) past the budget."""
        pid = part.process.pid if part.process and part.process.proc else None
        w.last_exit, w.last_exit_at = reason, utc_now()
        w.up_since, w.answering = None, False
        w.history = [t for t in w.history if now - t < self.policy.window_s]
        decision = self.policy.decide(w.history, now)
        self._dirty = True
        if decision.give_up:
            w.phase = PartPhase.FAILED
            log.critical(
                "%s (pid %s) %s, after %d restarts within %.0f s: giving up; medbatch up stops "
                "everything and exits non-zero. Its log: %s",
                part.name,
                pid,
                reason,
                decision.recent,
                self.policy.window_s,
                part.process.log_path if part.process else "-",
            )
            self.audit(
                "stack.process_gave_up",
                f"process:{part.name}",
                {
                    "pid": pid,
                    "exit": reason,
                    "restarts_in_window": decision.recent,
                    "window_s": self.policy.window_s,
                },
            )
            return True
        w.history.append(now)
        w.restarts += 1
        w.next_start = now + decision.delay_s
        w.phase = PartPhase.BACKOFF
        log.warning(
            "%s (pid %s) %s; restarting it in %.1f s (restart %d in the last %.0f s, at most %d)",
            part.name,
            pid,
            reason,
            decision.delay_s,
            decision.recent + 1,
            self.policy.window_s,
            self.policy.budget,
        )
        self.audit(
            "stack.process_exited",
            f"process:{part.name}",
            {
                "pid": pid,
                "exit": reason,
                "restart_in_s": decision.delay_s,
                "restarts": w.restarts,
            },
        )
        return False

    def _probe_external(self, part: Part, w: _Watch, now: float) -> None:
        if now < w.next_probe:
            return
        w.next_probe = now + self.probe_interval_s
        answering = part.probe()
        if answering == w.answering:
            return
        w.answering, self._dirty = answering, True
        if not answering:
            w.up_since = None
            log.error(
                "%s at %s does not answer; medbatch up did not start it and does not restart "
                "it: whoever runs it must",
                part.name,
                part.address,
            )
            self.audit("stack.service_unreachable", f"service:{part.name}", {"at": part.address})
        else:
            w.up_since = utc_now()
            log.warning("%s at %s answers again", part.name, part.address)
            self.audit("stack.service_answering", f"service:{part.name}", {"at": part.address})

    # --- what others read ---------------------------------------------------------------------
    def external_names(self) -> list[str]:
        return [p.name for p in self.parts if not p.managed]

    def restart_counts(self) -> dict[str, int]:
        return {p.name: self.watch[p.name].restarts for p in self.parts if p.managed}

    def snapshot(self, *, outcome: str | None = None, stopped: bool = False) -> StackState:
        now = utc_now()
        parts = []
        for p in self.parts:
            w = self.watch[p.name]
            # (not alive(): that would collect an exit the loop has not handled yet)
            alive = p.process is not None and w.phase in (PartPhase.RUNNING, PartPhase.STARTING)
            parts.append(
                PartState(
                    name=p.name,
                    kind=p.kind,
                    managed=p.managed,
                    phase=w.phase,
                    address=p.address,
                    pid=p.process.pid if alive and p.process else None,
                    node=p.node,
                    up_since=w.up_since,
                    restarts=w.restarts,
                    last_exit=w.last_exit,
                    last_exit_at=w.last_exit_at,
                    answering=w.answering,
                )
            )
        return StackState(
            supervisor_pid=os.getpid(),
            host=socket.gethostname(),
            started_at=self.started_at,
            updated_at=now,
            stopped_at=now if stopped else None,
            outcome=outcome,
            parts=parts,
        )

    def _write_state_if_due(self) -> None:
        if self._dirty or self.clock() - self._last_write >= HEARTBEAT_S:
            self._write_state()

    def _write_state(self, *, outcome: str | None = None, stopped: bool = False) -> None:
        if self.state_file is None:
            return
        try:
            write_state(self.state_file, self.snapshot(outcome=outcome, stopped=stopped))
        except OSError as exc:
            if not self._write_failed:  # say it once, not every half second
                log.error("cannot write the stack state file %s: %s", self.state_file, exc)
            self._write_failed = True
            return
        self._write_failed = False
        self._dirty, self._last_write = False, self.clock()
