"""The supervisor on real processes (small Python servers on free ports): a SIGKILLed process is
restarted after its back-off, a process that keeps dying makes supervision give up, an external
service is watched and never restarted; and the restart policy on its own."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.audit import verify_chain
from db.migrate import upgrade
from db.models import AuditEvent
from db.session import session_scope
from medbatch.stack.process import ManagedProcess, describe_exit, free_port, port_open
from medbatch.stack.state import PartKind, PartPhase, read_state
from medbatch.stack.supervisor import (
    Part,
    RestartPolicy,
    SupervisionOutcome,
    Supervisor,
    db_audit_sink,
)
from tests.helpers import wait_until

# A tiny TCP server: "answering" means accepting connections, as the listener does. With
# CHILD_PID_FILE it first starts a child in its own process group that outlives a SIGKILL.
SERVER = """
import os, socket, subprocess, sys, time
if os.environ.get("CHILD_PID_FILE"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
time.sleep(float(os.environ.get("DELAY_S", "0")))
if os.environ.get("EXIT_CODE"):
    sys.exit(int(os.environ["EXIT_CODE"]))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
time.sleep(600)
"""


@dataclass
class Recorder:
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, action: str, subject: str, details: dict[str, Any]) -> None:
        self.events.append((action, subject, details))

    def actions(self, subject: str | None = None) -> list[str]:
        return [a for a, s, _ in self.events if subject is None or s == subject]


class ServerPart:
    """A part whose launcher starts :data:`SERVER` on one port; env tweaks per launch."""

    def __init__(self, tmp: Path, name: str = "srv", **env: str) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.env = env
        self.launches = 0
        self.part = Part(
            name,
            PartKind.LISTENER,
            lambda: port_open("127.0.0.1", self.port),
            launch=self.launch,
            ready_timeout_s=20.0,
            address=f"127.0.0.1:{self.port}",
        )

    def launch(self) -> ManagedProcess:
        self.launches += 1
        env = {**os.environ, "PORT": str(self.port), **self.env}
        proc = ManagedProcess(
            f"srv-{self.launches}", [sys.executable, "-c", SERVER], env, self.tmp / "srv.log"
        ).start()
        self.part.process = proc
        return proc

    def start(self) -> ManagedProcess:
        proc = self.launch()
        proc.wait_until(self.part.probe, 20, "listening")
        return proc


@dataclass
class Running:
    supervisor: Supervisor
    stop: threading.Event
    thread: threading.Thread
    outcome: list[SupervisionOutcome]


@pytest.fixture
def run_supervisor() -> Iterator[Any]:
    started: list[tuple[Running, list[Part]]] = []

    def start(parts: list[Part], policy: RestartPolicy, **kw: Any) -> Running:
        sup = Supervisor(parts, policy, poll_s=0.05, probe_interval_s=0.1, **kw)
        stop = threading.Event()
        outcome: list[SupervisionOutcome] = []
        thread = threading.Thread(target=lambda: outcome.append(sup.run(stop)), daemon=True)
        thread.start()
        running = Running(sup, stop, thread, outcome)
        started.append((running, parts))
        return running

    yield start
    for running, parts in started:
        running.stop.set()
        running.thread.join(10)
        for p in parts:
            if p.process is not None:
                p.process.stop(timeout=5)


FAST = RestartPolicy(base_s=0.2, max_s=1.0, budget=3, window_s=60.0)


def _pid(part: Part) -> int:
    assert part.process is not None
    return part.process.pid


# --- the policy ------------------------------------------------------------------------------
def test_the_back_off_doubles_per_recent_restart_up_to_the_maximum() -> None:
    policy = RestartPolicy(base_s=1.0, max_s=5.0, budget=10, window_s=100.0)
    history: list[float] = []
    delays = []
    for now in range(0, 50, 10):
        d = policy.decide(history, float(now))
        delays.append(d.delay_s)
        history.append(float(now))
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_the_budget_counts_restarts_inside_the_window_only() -> None:
    policy = RestartPolicy(base_s=1.0, max_s=60.0, budget=2, window_s=100.0)
    assert not policy.decide([], 0.0).give_up
    assert not policy.decide([0.0], 10.0).give_up
    gave_up = policy.decide([0.0, 10.0], 20.0)
    assert gave_up.give_up and gave_up.recent == 2 and gave_up.delay_s == 0.0
    # the first restart has aged out of the window: allowed again, with a shorter back-off
    later = policy.decide([0.0, 10.0], 105.0)
    assert not later.give_up and later.recent == 1 and later.delay_s == 2.0
    # once a day: always the base delay
    assert policy.decide([0.0, 86400.0], 2 * 86400.0).delay_s == 1.0


def test_a_budget_of_zero_never_restarts() -> None:
    assert RestartPolicy(base_s=1.0, max_s=1.0, budget=0, window_s=1.0).decide([], 0.0).give_up


def test_exit_statuses_read_as_an_operator_reads_them() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(0) == "exited with code 0"


# --- the loop on real processes --------------------------------------------------------------
def test_a_killed_process_is_restarted_after_its_back_off_and_recorded(
    tmp_path: Path, run_supervisor: Any
) -> None:
    srv = ServerPart(tmp_path)
    srv.start()
    first = _pid(srv.part)
    audit = Recorder()
    state_file = tmp_path / "stack-state.json"
    running = run_supervisor([srv.part], FAST, audit=audit, state_file=state_file)
    wait_until(lambda: state_file.exists(), 5, "the state file")

    os.kill(first, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: srv.launches == 2, 10, "the restart")
    assert time.monotonic() - killed_at >= FAST.base_s  # it waited out the back-off
    wait_until(
        lambda: (
            running.supervisor.watch["srv"].phase is PartPhase.RUNNING
            and srv.part.probe()
            and "stack.process_restarted" in audit.actions()
        ),
        20,
        "the server to answer again",
    )
    assert _pid(srv.part) != first

    wait_until(lambda: (read_state(state_file) or _never()).parts[0].restarts == 1, 10, "state")
    state = read_state(state_file)
    assert state is not None and state.supervisor_pid == os.getpid() and state.stopped_at is None
    (part,) = state.parts
    assert part.phase is PartPhase.RUNNING and part.managed and part.pid == _pid(srv.part)
    assert part.last_exit == "killed by SIGKILL" and part.last_exit_at is not None
    assert part.up_since is not None and part.up_since > part.last_exit_at

    assert audit.actions("process:srv") == ["stack.process_exited", "stack.process_restarted"]
    exited = next(d for a, _, d in audit.events if a == "stack.process_exited")
    assert exited == {
        "pid": first,
        "exit": "killed by SIGKILL",
        "restart_in_s": FAST.base_s,
        "restarts": 1,
    }
    assert not list(tmp_path.glob(".stack-state.json.*"))  # no temporary file left behind

    running.stop.set()
    running.thread.join(10)
    assert running.outcome == [SupervisionOutcome()]
    final = read_state(state_file)
    assert final is not None and final.stopped_at is not None and final.outcome == "stopped"
    assert final.parts[0].phase is PartPhase.STOPPED and final.parts[0].pid is None


def _never() -> Any:
    raise AssertionError("no state file")


def test_a_process_that_keeps_dying_exhausts_the_budget_and_supervision_gives_up(
    tmp_path: Path, run_supervisor: Any
) -> None:
    srv = ServerPart(tmp_path)
    srv.start()
    audit = Recorder()
    policy = RestartPolicy(base_s=0.1, max_s=0.4, budget=2, window_s=60.0)
    running = run_supervisor([srv.part], policy, audit=audit, state_file=tmp_path / "s.json")
    for launch in (2, 3):
        os.kill(_pid(srv.part), signal.SIGKILL)
        wait_until(lambda n=launch: srv.launches == n, 10, f"launch {launch}")  # type: ignore[misc]
        wait_until(lambda: running.supervisor.watch["srv"].phase is PartPhase.RUNNING, 20, "up")
    os.kill(_pid(srv.part), signal.SIGKILL)
    running.thread.join(10)
    assert not running.thread.is_alive(), "supervision did not give up"
    (outcome,) = running.outcome
    assert outcome.gave_up == "srv"
    assert outcome.reason == "srv killed by SIGKILL, after 2 restarts within 60 s"
    assert outcome.log_path == tmp_path / "srv.log"
    assert srv.launches == 3  # no fourth start
    assert audit.actions("process:srv")[-1] == "stack.process_gave_up"
    assert audit.actions()[-1] == "stack.supervision_ended"
    state = read_state(tmp_path / "s.json")
    assert state is not None and state.parts[0].phase is PartPhase.FAILED
    assert state.outcome == outcome.reason and state.parts[0].restarts == 2


def test_an_exit_status_and_a_restart_that_never_answers_both_count(
    tmp_path: Path, run_supervisor: Any
) -> None:
    srv = ServerPart(tmp_path)
    srv.start()
    audit = Recorder()
    policy = RestartPolicy(base_s=0.1, max_s=0.1, budget=1, window_s=60.0)
    srv.part.ready_timeout_s = 1.0
    srv.env["DELAY_S"] = "30"  # the restarted one does not answer in time
    run = run_supervisor([srv.part], policy, audit=audit)
    os.kill(_pid(srv.part), signal.SIGTERM)
    run.thread.join(15)
    assert not run.thread.is_alive()
    exits = [d["exit"] for a, _, d in audit.events if a.startswith("stack.process_")]
    assert exits == ["killed by SIGTERM", "not answering 1 s after its restart"]
    assert srv.part.process is not None and not srv.part.process.alive()  # it was killed

    srv2 = ServerPart(tmp_path, name="srv2", EXIT_CODE="3", DELAY_S="0.3")
    proc = srv2.launch()
    audit2 = Recorder()
    run2 = run_supervisor(
        [srv2.part], RestartPolicy(base_s=0.1, max_s=0.1, budget=1, window_s=60.0), audit=audit2
    )
    run2.thread.join(15)
    assert proc.returncode == 3
    details = [d for a, _, d in audit2.events if a.startswith("stack.process_")]
    assert [d["exit"] for d in details] == [
        "exited with code 3",
        "exited with code 3 while starting",
    ]


def test_what_a_killed_leader_leaves_in_its_group_is_killed_before_the_restart(
    tmp_path: Path, run_supervisor: Any
) -> None:
    child_file = tmp_path / "child.pid"
    srv = ServerPart(tmp_path, CHILD_PID_FILE=str(child_file))
    srv.start()
    child = int(child_file.read_text())
    assert _alive(child)
    run_supervisor([srv.part], FAST)
    os.kill(_pid(srv.part), signal.SIGKILL)  # only the leader, as the OOM killer would
    wait_until(lambda: srv.launches == 2, 10, "the restart")
    wait_until(lambda: not _alive(child), 5, "the orphaned child to be killed")


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_an_external_service_is_watched_and_reported_never_restarted(
    tmp_path: Path, run_supervisor: Any
) -> None:
    answering = threading.Event()
    answering.set()
    external = Part("triton", PartKind.TRITON, answering.is_set, address="http://elsewhere:8000")
    audit = Recorder()
    running = run_supervisor([external], FAST, audit=audit, state_file=tmp_path / "s.json")
    answering.clear()
    wait_until(lambda: "stack.service_unreachable" in audit.actions(), 5, "the report")
    wait_until(
        lambda: (
            (s := read_state(tmp_path / "s.json")) is not None and s.parts[0].answering is False
        ),
        5,
        "the state file to say so",
    )
    state = read_state(tmp_path / "s.json")
    assert state is not None
    assert state.parts[0].phase is PartPhase.EXTERNAL and not state.parts[0].managed
    answering.set()
    wait_until(lambda: "stack.service_answering" in audit.actions(), 5, "the recovery")
    assert running.supervisor.watch["triton"].restarts == 0
    assert audit.actions("service:triton") == [
        "stack.service_unreachable",
        "stack.service_answering",
    ]
    assert audit.events[0] == (
        "stack.supervision_started",
        "stack",
        {"parts": [], "watched": ["triton"]},
    )


def test_the_supervisor_audits_into_the_hash_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    sink = db_audit_sink(url)
    sink("stack.process_exited", "process:listener", {"exit": "killed by SIGKILL", "pid": 7})
    with session_scope(url) as session:
        (event,) = session.scalars(select(AuditEvent)).all()
        assert event.actor.startswith("supervisor:")
        assert (event.action, event.subject) == ("stack.process_exited", "process:listener")
        assert event.details == {"exit": "killed by SIGKILL", "pid": 7}
        assert verify_chain(session).ok
    # a database that is gone is logged, and the supervision goes on
    db_audit_sink(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")("stack.x", "stack", {})
