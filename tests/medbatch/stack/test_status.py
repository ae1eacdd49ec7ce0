"""``stack_status`` (``medbatch status``, the API's /readyz) without a running stack: the live
probes say no, the state file of a ``medbatch up`` that died is recognised, a broken state file is
named. The same with everything running is tested on the real stack in
tests/test_cli_up_supervision.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import Settings, get_settings, settings_env
from medbatch.cli import app
from medbatch.services.health import Supervision, stack_status
from medbatch.stack.process import free_port
from medbatch.stack.state import (
    PartKind,
    PartPhase,
    PartState,
    StackState,
    state_path,
    utc_now,
    write_state,
)


def _nothing_running(tmp: Path, **overrides: object) -> Settings:
    """Every setting the status depends on, given (the session's stack exports its own)."""
    values: dict[str, object] = {
        "storage_dir": tmp,
        "database_url": f"sqlite:///{tmp / 'medbatch.db'}",
        "broker_url": f"redis://:secret@127.0.0.1:{free_port()}/0",
        "triton_host": "127.0.0.1",
        "triton_http_port": free_port(),
        "dicom_bind_address": "127.0.0.1",
        "dicom_port": free_port(),
        "dicom_allowed_aes": "",
        "dicom_allow_any_ae": False,
        "api_bind_address": "127.0.0.1",
        "api_port": free_port(),
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_nothing_running_and_no_state_file(tmp_path: Path) -> None:
    st = stack_status(_nothing_running(tmp_path))
    assert st.supervision is Supervision.NONE and not st.ready and not st.all_answering
    assert [(p.name, p.ok, p.required) for p in st.parts] == [
        ("database", True, True),  # SQLite in the storage directory
        ("redis", False, True),
        ("triton", False, True),
        ("workers", False, False),
    ]
    assert st.failing == ["redis", "triton"] and st.workers == [] and st.queues == {}
    assert "secret" not in st.model_dump_json()  # the broker password stays out
    assert "redis://:***@127.0.0.1" in st.parts[1].detail
    assert any("Redis does not answer" in n for n in st.notes)


def test_a_site_that_receives_studies_needs_its_listener(tmp_path: Path) -> None:
    st = stack_status(_nothing_running(tmp_path, dicom_allowed_aes="PACS"))
    listener = next(p for p in st.parts if p.name == "listener")
    assert listener.required and not listener.ok
    assert listener.detail.startswith("no DICOM listener at 127.0.0.1:")
    assert st.failing == ["redis", "triton", "listener"]


def test_the_state_of_an_up_that_died_is_shown_as_gone(tmp_path: Path) -> None:
    settings = _nothing_running(tmp_path)
    now = utc_now()
    write_state(
        state_path(tmp_path),
        StackState(
            supervisor_pid=_dead_pid(),
            host=__import__("socket").gethostname(),
            started_at=now - timedelta(hours=1),
            updated_at=now,
            parts=[
                PartState(
                    name="listener",
                    kind=PartKind.LISTENER,
                    managed=True,
                    phase=PartPhase.RUNNING,
                    pid=12345,
                    restarts=2,
                    last_exit="killed by SIGKILL",
                    answering=True,
                )
            ],
        ),
    )
    st = stack_status(settings)
    assert st.supervision is Supervision.GONE and not st.ready
    assert [p.name for p in st.parts] == ["database", "listener", "redis", "triton", "workers"]
    listener = st.parts[1]
    assert listener.restarts == 2 and not listener.ok and listener.pid == 12345
    assert listener.last_exit == "killed by SIGKILL" and listener.phase is PartPhase.RUNNING
    assert any("is gone without having stopped its parts" in n for n in st.notes)


def test_a_broken_state_file_is_named_not_fatal(tmp_path: Path) -> None:
    state_path(tmp_path).write_text('{"supervisor_pid": "nope"}')
    st = stack_status(_nothing_running(tmp_path))
    assert st.supervision is Supervision.NONE
    assert any("is not one this medbatch writes" in n for n in st.notes)


@pytest.fixture
def env_of(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def use(settings: Settings) -> None:
        for key, value in settings_env(settings).items():
            if key.startswith("MEDBATCH_"):
                monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


def test_medbatch_status_exits_1_when_a_part_does_not_answer(tmp_path: Path, env_of) -> None:  # type: ignore[no-untyped-def]
    env_of(_nothing_running(tmp_path))
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert body["ready"] is False and body["supervision"] == "none"
    assert {p["name"] for p in body["parts"]} == {"database", "redis", "triton", "workers"}
    assert body["failing"] == ["redis", "triton"]
    table = CliRunner().invoke(app, ["status"])
    assert table.exit_code == 1 and "redis" in table.output and "medbatch up: none" in table.output
