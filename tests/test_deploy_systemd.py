"""deploy/systemd: the unit parses (systemd's own `systemd-analyze verify` where installed), runs
a command the CLI really has, as its own user, restarts on failure, logs to the journal; the
example environment file names real settings with values they accept."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from dotenv import dotenv_values

from core.settings import REPO_ROOT, Settings
from medbatch.cli import app

UNIT = REPO_ROOT / "deploy" / "systemd" / "medbatch.service"
ENV = REPO_ROOT / "deploy" / "systemd" / "medbatch.env"
INSTALLED_BIN = "/opt/medbatch/.venv/bin/medbatch"
INSTALLED_ENV = "/etc/medbatch/medbatch.env"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_medbatch_up_listen_as_its_own_user_and_restarts_on_failure() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert svc["User"] == svc["Group"] == "medbatch"
    assert svc["Restart"] == "on-failure"
    assert svc["EnvironmentFile"] == INSTALLED_ENV
    assert svc["StandardOutput"] == svc["StandardError"] == "journal"
    assert svc["KillMode"] == "mixed"  # SIGTERM to `up`, which stops its parts in order
    assert svc["StateDirectory"] == "medbatch" and svc["WorkingDirectory"] == "/var/lib/medbatch"
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    binary, *args = shlex.split(svc["ExecStart"])
    assert binary == INSTALLED_BIN and args == ["up", "--listen"]
    # the arguments are ones the real CLI accepts (parsed by click, not run)
    group = typer.main.get_command(app)
    ctx = group.make_context("medbatch", list(args), resilient_parsing=False)
    name, command, rest = group.resolve_command(ctx, list(args))  # type: ignore[attr-defined]
    assert name == "up" and command is not None
    sub = command.make_context(name, rest, parent=ctx)
    assert sub.params["listen"] is True


def test_the_environment_file_names_real_settings_with_valid_values() -> None:
    fields = {f"MEDBATCH_{name.upper()}" for name in Settings.model_fields}
    text = ENV.read_text()
    mentioned = {
        line.lstrip("#").split("=", 1)[0].strip()
        for line in text.splitlines()
        if line.lstrip("#").startswith("MEDBATCH_") and "=" in line
    }
    assert mentioned and mentioned <= fields, mentioned - fields
    values = dotenv_values(ENV)
    assert values["MEDBATCH_STORAGE_DIR"] == "/var/lib/medbatch"  # the unit's StateDirectory
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, **{k.removeprefix("MEDBATCH_").lower(): v for k, v in values.items()}
    )
    assert settings.dicom_allowed_aes == "PACS@10.0.0.5, CT1@10.0.1.0/24"  # quotes removed
    assert settings.supervise_restart_budget == 5


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must verify the unit")
        pytest.skip(message)
    # The unit as installed, with this checkout's command and environment file in their place.
    medbatch = Path(sys.executable).parent / "medbatch"
    unit = tmp_path / "medbatch.service"
    unit.write_text(
        UNIT.read_text().replace(INSTALLED_BIN, str(medbatch)).replace(INSTALLED_ENV, str(ENV))
    )
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if str(unit) in line or "medbatch.service" in line
    ]
    assert done.returncode == 0, done.stdout + done.stderr
    assert not complaints, complaints  # unknown keys or bad values are only warnings
