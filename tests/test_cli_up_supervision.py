"""`medbatch up --listen` keeps what it started running. One real `up` process for the module;
the listener, a worker's main process, Triton, the private Redis and the HTTP API are SIGKILLed
in turn, each with work in flight. Each must be back within its back-off (plus its start-up), the
work in flight must complete exactly once (counted in predictions and results rows, not job
states), and work submitted afterwards must complete. `medbatch status` and the API's /readyz
then show every part's restart and last exit. Last, a part that keeps dying exhausts the restart
budget: `up` stops everything and exits non-zero.

The tests run in file order against the same `up`; each first checks that every part answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from core.job_kinds import JobKind
from core.settings import Settings, get_settings, settings_env
from db.models import AuditEvent, DicomInstance, DicomResult, DicomStudy, Job, JobState
from db.session import dispose_all, session_scope
from ingest.chem.submit import submit_library
from medbatch.services.tokens import Scope, create_token
from medbatch.stack import probes, redis_server, triton_server
from medbatch.stack.state import PartPhase, PartState, read_state, state_path
from medbatch.stack.worker_process import use_settings
from tests.conftest import make_settings
from tests.dicom_data import associate, make_series
from tests.helpers import (
    chunk_jobs,
    job_state,
    predictions_for,
    unique_valid,
    wait_for_job,
    wait_until,
    write_smi,
)
from workers.dispatch import publish

pytestmark = [pytest.mark.server, pytest.mark.slow]

BUDGET = 2  # restarts per part within the window; the last test exhausts the listener's
BACKOFF_S = 0.5
# How long a part may take to be back after its exit is noticed: the back-off plus starting the
# process again (Triton loads four models: the longest, on a busy 2-core machine).
BACK_WITHIN_S = {"listener": 45.0, "worker-0": 60.0, "redis": 30.0, "triton": 150.0, "api": 45.0}
PARTS = ("redis", "triton", "worker-0", "listener", "api")


@dataclass
class Up:
    settings: Settings
    proc: subprocess.Popen[bytes]
    log: Path
    tmp: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def part(self, name: str) -> PartState:
        state = read_state(state_path(self.settings.storage_dir))
        assert state is not None, "medbatch up wrote no state file"
        return next(p for p in state.parts if p.name == name)

    def pid(self, name: str) -> int:
        pid = self.part(name).pid
        assert pid is not None, f"{name} has no pid: {self.part(name)}"
        return pid

    def all_answer(self) -> None:
        assert self.proc.poll() is None, self.output()
        s = self.settings
        assert redis_server.ping(s.broker_url), "redis does not answer"
        assert triton_server.is_ready(s), "triton is not ready"
        assert probes.listener(s).ok, "the listener does not answer"
        assert probes.api(s).ok, "the API does not answer /healthz"
        for p in PARTS:
            assert self.part(p).phase is PartPhase.RUNNING, self.part(p)

    def back_after_kill(self, name: str, old_pid: int, restarts: int) -> float:
        """Seconds from the SIGKILL (just before) until ``name`` runs again as a new process."""
        t0 = time.monotonic()

        def back() -> bool:
            assert self.proc.poll() is None, self.output()
            p = self.part(name)
            return p.phase is PartPhase.RUNNING and p.restarts == restarts and p.pid != old_pid

        wait_until(back, BACK_WITHIN_S[name], f"{name} to be back", every=0.2)
        part = self.part(name)
        assert part.last_exit == "killed by SIGKILL" and part.up_since is not None
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("up")
    settings = make_settings(
        tmp,
        supervise_backoff_base_s=BACKOFF_S,
        supervise_backoff_max_s=2.0,
        supervise_restart_budget=BUDGET,
        supervise_restart_window_s=3600.0,
        supervise_poll_s=0.25,
        dicom_destination="",  # results stay here: no send jobs waiting for a PACS
        dicom_quiet_period_s=10.0,
        visibility_timeout_s=12,
        triton_max_retries=100,  # chunks wait for Triton through its restart
    )
    log = tmp / "up.log"
    saved = dict(os.environ)
    use_settings(settings)  # this process submits and reads with the same settings
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "medbatch"), "up", "--listen"],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            # the stack's working directory is its storage_dir, as under systemd
            cwd=tmp,
            start_new_session=True,
        )
    handle = Up(settings, proc, log, tmp)
    try:
        deadline = time.monotonic() + 300
        while "medbatch is up" not in handle.output():
            assert proc.poll() is None, handle.output()
            assert time.monotonic() < deadline, "not up after 300 s:\n" + handle.output()
            time.sleep(0.5)
        wait_until(lambda: state_path(tmp).exists(), 10, "the state file")
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        use_settings(get_settings())
        dispose_all()


def _library(up: Up, nci_smiles: list[tuple[str, str]], n: int, skip: int, name: str) -> Path:
    mols = unique_valid(nci_smiles, n, skip=skip)
    return write_smi(up.tmp / name, [f"{s}\t{m}" for s, m, _ in mols])


def _screen_and_check(up: Up, library: Path, n: int, timeout: float = 180) -> int:
    """Submit, wait, and count: n predictions, each compound once."""
    res = submit_library(library, up.settings, publish)
    done = wait_for_job(up.settings, res.job_id, timeout=timeout)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(up.settings, res.job_id)
    assert len(preds) == n == len({p.compound_id for p in preds})
    return res.job_id


def _audited_exits(up: Up, name: str) -> list[dict[str, object]]:
    with session_scope(up.settings.database_url) as s:
        return [
            dict(d)
            for d in s.scalars(
                select(AuditEvent.details).where(
                    AuditEvent.action == "stack.process_exited",
                    AuditEvent.subject == f"process:{name}",
                )
            )
        ]


def _count(up: Up, model: type, *where: object) -> int:
    with session_scope(up.settings.database_url) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _stop_triton(up: Up) -> int:
    """SIGSTOP Triton (and its backend stubs): a worker calling it blocks mid-chunk."""
    pid = up.pid("triton")
    os.killpg(pid, signal.SIGSTOP)
    return pid


def test_the_listener_killed_mid_association_is_back_and_the_resent_study_is_scored_once(
    up: Up,
) -> None:
    up.all_answer()
    s = up.settings
    paths = make_series(up.tmp / "study", 20)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    old = up.pid("listener")
    assoc = associate(s)
    assert assoc.is_established
    acknowledged = 0
    for p in paths:
        if acknowledged == 12:
            os.kill(old, signal.SIGKILL)  # the association is cut mid-study
        try:
            status = assoc.send_c_store(pydicom.dcmread(p))
        except Exception:
            break
        if not status or status.get("Status") != 0x0000:
            break
        acknowledged += 1
    assoc.abort()
    assert acknowledged == 12

    took = up.back_after_kill("listener", old, restarts=1)
    assert probes.listener(s).ok
    # the PACS resends the whole study; what was stored already is not stored again
    assoc = associate(s)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 20

    with session_scope(s.database_url) as session:
        study_id = session.scalars(
            select(DicomStudy.id).where(DicomStudy.study_uid == study_uid)
        ).one()

    def study_jobs() -> list[Job]:
        with session_scope(s.database_url) as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(
                        Job.kind == JobKind.DICOM_STUDY.value,
                        Job.source == f"dicom-study:{study_id}",
                    )
                    .order_by(Job.id)
                )
            )

    def scored() -> bool:
        jobs = study_jobs()
        return bool(jobs) and jobs[-1].item_count == 20 and jobs[-1].state == "done"

    wait_until(scored, s.dicom_quiet_period_s + 120, "the resent study to be scored")
    assert _count(up, DicomInstance, DicomInstance.study_id == study_id) == 20
    jobs = study_jobs()
    # One job per version, each finished once; the last covers the whole resent study. Had the
    # restart and the resend of what was stored taken longer than the quiet period, the 12 first
    # instances were closed as version 1 (not applicable: fewer slices than a CT needs) and the
    # resend re-opened the study as version 2: the documented late-instance behaviour.
    assert [j.params["version"] for j in jobs] == list(range(1, len(jobs) + 1))
    assert [j.item_count for j in jobs] in ([20], [12, 20]), [(j.id, j.item_count) for j in jobs]
    assert all(j.state in ("done", "not_applicable") for j in jobs[:-1])
    with session_scope(s.database_url) as session:
        results = list(session.scalars(select(DicomResult).where(DicomResult.study_id == study_id)))
    scored_versions = [j.params["version"] for j in jobs if j.state == "done"]
    assert sorted(r.version for r in results) == scored_versions  # one result per scored version
    assert max(results, key=lambda r: r.version).instance_count == 20
    assert _audited_exits(up, "listener")[-1]["exit"] == "killed by SIGKILL"
    print(f"listener back {took:.1f} s after SIGKILL; study versions: {len(jobs)}")


def test_a_worker_main_process_killed_mid_chunk_is_replaced_and_the_chunk_scored_once(
    up: Up, nci_smiles: list[tuple[str, str]]
) -> None:
    up.all_answer()
    s = up.settings
    library = _library(up, nci_smiles, s.chem_chunk_size, 2000, "worker-kill.smi")
    old, old_node = up.pid("worker-0"), up.part("worker-0").node
    triton = _stop_triton(up)
    try:
        res = submit_library(library, s, publish)
        (chunk_id,) = res.chunk_ids
        wait_until(lambda: job_state(s, chunk_id) == "running", 60, "the chunk to start")
        os.kill(old, signal.SIGKILL)  # the main process only; its pool child is orphaned
        # (Triton stays stopped until the worker is back: the orphan, killed by then, must not
        # get to finish the chunk, or the count of deliveries below would not be the point)
        took = up.back_after_kill("worker-0", old, restarts=1)
    finally:
        os.killpg(triton, signal.SIGCONT)
    assert up.part("worker-0").node != old_node

    done = wait_for_job(s, res.job_id, timeout=s.visibility_timeout_s + 120)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(s, res.job_id)
    assert len(preds) == s.chem_chunk_size == len({p.compound_id for p in preds})
    (chunk,) = chunk_jobs(s, res.job_id)
    assert chunk.attempts == 2  # the killed delivery and the redelivery, nothing more
    assert _audited_exits(up, "worker-0")[-1]["exit"] == "killed by SIGKILL"
    _screen_and_check(up, _library(up, nci_smiles, 5, 2100, "after-worker.smi"), 5)
    print(f"worker back {took:.1f} s after SIGKILL")


def test_triton_killed_is_restarted_and_chunks_waiting_for_it_complete_once(
    up: Up, nci_smiles: list[tuple[str, str]]
) -> None:
    up.all_answer()
    s = up.settings
    n = 2 * s.chem_chunk_size
    library = _library(up, nci_smiles, n, 2200, "triton-kill.smi")
    old = up.pid("triton")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not triton_server.is_ready(s), 10, "Triton to be gone")
    res = submit_library(library, s, publish)  # while Triton is down and restarting
    took = up.back_after_kill("triton", old, restarts=1)
    done = wait_for_job(s, res.job_id, timeout=120)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(s, res.job_id)
    assert len(preds) == n == len({p.compound_id for p in preds})
    assert _audited_exits(up, "triton")[-1]["exit"] == "killed by SIGKILL"
    _screen_and_check(up, _library(up, nci_smiles, 5, 2300, "after-triton.smi"), 5)
    print(f"triton back {took:.1f} s after SIGKILL")


def test_the_private_redis_killed_mid_chunk_is_restarted_and_nothing_is_lost_or_doubled(
    up: Up, nci_smiles: list[tuple[str, str]]
) -> None:
    up.all_answer()
    s = up.settings
    library = _library(up, nci_smiles, s.chem_chunk_size + 4, 2400, "redis-kill.smi")
    old = up.pid("redis")
    triton = _stop_triton(up)
    try:
        res = submit_library(library, s, publish)
        first, _second = res.chunk_ids
        wait_until(lambda: job_state(s, first) == "running", 60, "the first chunk to start")
        time.sleep(1.5)  # the append-only file is synced every second
        os.kill(old, signal.SIGKILL)
    finally:
        os.killpg(triton, signal.SIGCONT)
    took = up.back_after_kill("redis", old, restarts=1)
    assert redis_server.ping(s.broker_url)
    done = wait_for_job(s, res.job_id, timeout=s.visibility_timeout_s + 180)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(s, res.job_id)
    assert len(preds) == s.chem_chunk_size + 4 == len({p.compound_id for p in preds})
    assert all(c.state == "done" for c in chunk_jobs(s, res.job_id))
    assert _audited_exits(up, "redis")[-1]["exit"] == "killed by SIGKILL"
    _screen_and_check(up, _library(up, nci_smiles, 5, 2500, "after-redis.smi"), 5)
    print(f"redis back {took:.1f} s after SIGKILL")


def _upload(boundary: str, name: str, content: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_the_api_killed_mid_upload_is_back_and_the_resent_upload_is_one_job(
    up: Up, nci_smiles: list[tuple[str, str]]
) -> None:
    up.all_answer()
    s = up.settings
    _, token = create_token(s, "supervision-test", frozenset({Scope.SUBMIT, Scope.READ}), actor="t")
    library = _library(up, nci_smiles, 20, 2600, "api-kill.smi").read_bytes()
    body = _upload("medbatch-test-boundary", "api-kill.smi", library)
    old = up.pid("api")
    with socket.create_connection(probes.api_address(s), timeout=10) as half_sent:
        half_sent.sendall(
            (
                "POST /api/v1/libraries HTTP/1.1\r\nHost: medbatch\r\n"
                f"Authorization: Bearer {token}\r\n"
                "Content-Type: multipart/form-data; boundary=medbatch-test-boundary\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        time.sleep(1.0)  # the API is reading the upload when it dies
        os.kill(old, signal.SIGKILL)
    took = up.back_after_kill("api", old, restarts=1)

    with httpx.Client(
        base_url=s.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        answer = client.post("/api/v1/libraries", files={"file": ("api-kill.smi", library)})
        # 201: a new job, so the upload cut by the kill left none behind
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
    done = wait_for_job(s, job_id, timeout=180)
    assert done.state == JobState.DONE.value, done.error
    preds = predictions_for(s, job_id)
    assert len(preds) == 20 == len({p.compound_id for p in preds})
    assert _audited_exits(up, "api")[-1]["exit"] == "killed by SIGKILL"
    print(f"api back {took:.1f} s after SIGKILL")


def _check_supervised(parts: dict[str, dict[str, object]]) -> None:
    """Every part `up` runs, killed once by the tests above, answers again."""
    assert set(parts) == {"database", *PARTS}
    assert parts["database"]["ok"] and parts["database"]["managed"] is None
    for name in PARTS:
        p = parts[name]
        assert p["ok"] and p["managed"] and p["phase"] == "running", p
        assert p["restarts"] == 1 and p["last_exit"] == "killed by SIGKILL", p
        assert p["pid"] and p["up_since"] and p["last_exit_at"] < p["up_since"], p  # type: ignore[operator]
    assert str(parts["worker-0"]["node"]).startswith("medbatch-")


def test_medbatch_status_and_readyz_show_every_part_with_its_restarts_and_last_exit(
    up: Up,
) -> None:
    up.all_answer()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "medbatch"), "status", "--json"],
        env=settings_env(up.settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert body["ready"] is True and body["supervision"] == "running"
    assert body["supervisor_pid"] == up.proc.pid
    _check_supervised({p["name"]: p for p in body["parts"]})

    s = up.settings
    _, token = create_token(s, "readyz-test", frozenset({Scope.READ}), actor="t")
    ready = httpx.get(
        f"{s.api_url}/readyz", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True and body["failing"] == []
    assert body["supervision"]["supervision"] == "running"
    assert body["supervision"]["supervisor_pid"] == up.proc.pid
    _check_supervised({c["name"]: c for c in body["components"]})


def test_a_part_that_keeps_dying_makes_up_stop_everything_and_exit_non_zero(up: Up) -> None:
    up.all_answer()
    s = up.settings
    for restarts in range(2, BUDGET + 1):  # use up the budget
        old = up.pid("listener")
        os.kill(old, signal.SIGKILL)
        up.back_after_kill("listener", old, restarts=restarts)
    os.kill(up.pid("listener"), signal.SIGKILL)  # one more than the budget allows
    assert up.proc.wait(timeout=120) == 2, up.output()
    out = up.output()
    assert "listener" in out and "giving up" in out and "MEDBATCH_SUPERVISE_RESTART_BUDGET" in out
    assert not redis_server.ping(s.broker_url), "redis-server left running"
    assert not triton_server.is_ready(s), "tritonserver left running"
    assert not probes.api(s).ok, "the API left running"
    state = read_state(state_path(s.storage_dir))
    assert state is not None and state.stopped_at is not None
    assert state.outcome is not None and state.outcome.startswith("listener killed by SIGKILL")
    assert {p.name: p.phase for p in state.parts}["listener"] is PartPhase.FAILED
    with session_scope(s.database_url) as session:
        actions = list(
            session.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.action.like("stack.%"))
                .order_by(AuditEvent.seq)
            )
        )
    assert actions[0] == "stack.supervision_started"
    assert actions[-2:] == ["stack.process_gave_up", "stack.supervision_ended"]
    # each part's exit above, then the listener's until its budget was spent (the last exit is
    # audited as stack.process_gave_up)
    assert actions.count("stack.process_exited") == len(PARTS) - 1 + BUDGET
