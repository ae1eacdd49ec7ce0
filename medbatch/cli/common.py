"""What every command shares: the settings and logging, the two consoles, error exits,
waiting for a stop signal and progress bars that stay quiet in CI logs."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from medbatch.services.jobs import Progress as JobProgress

# The services (SQLAlchemy, the database models, and what each service needs) are imported in
# the functions that call them, not here: `medbatch --help` and a command that needs one service
# do not pay for all of them (tests/medbatch/test_cli_imports.py keeps it so).

console = Console(stderr=True)  # progress, notes and errors
out = Console()  # the answer itself (tables, counts)

__all__ = [
    "console",
    "export",
    "fail",
    "ok",
    "out",
    "progress",
    "settings",
    "stop_event",
    "terminal_user",
    "wait_for_stop",
    "wait_with_progress",
]


def settings() -> Settings:
    """The process's settings, with logging configured from them."""
    s = get_settings()
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return s


def terminal_user() -> str:
    """``user:<login>@<host>``: the person running a ``medbatch`` command."""
    from medbatch.services.actors import terminal_user as user

    return user()


def fail(exc: Exception) -> typer.Exit:
    """Print the error (its message says what to do) and exit with status 2."""
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


def ok(message: str) -> None:
    console.print(f"[green]✓[/] {message}")


def progress(*columns: Any) -> Progress:
    """A progress display on stderr, switched off in a CI log without a terminal."""
    return Progress(
        *columns,
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal and os.environ.get("CI") == "true",
    )


def stop_event() -> threading.Event:
    """An event set by SIGTERM (docker stop, systemd) or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def wait_for_stop() -> None:
    """Block until SIGTERM (docker stop, systemd) or SIGINT (Ctrl-C)."""
    stop = stop_event()
    while not stop.wait(0.2):  # a timed wait: the signal handler runs between waits
        pass


def wait_with_progress(s: Settings, job_id: int, timeout: float, what: str = "chunks") -> None:
    """Follow a job's children to the end with a progress bar."""
    from medbatch.services.jobs import wait_for_job

    with progress(
        TextColumn("[bold]scoring[/] job {task.fields[job]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(what),
    ) as bar:
        task = bar.add_task("score", total=None, job=job_id)

        def show(p: JobProgress) -> None:
            total = p.children_total
            bar.update(task, total=total or 1, completed=p.children_finished if total else 1)

        wait_for_job(s, job_id, timeout, show)


def export(s: Settings, job_id: int, out_file: Path, *, in_domain_only: bool = False) -> None:
    from medbatch.services.results import export_results  # pyarrow: only when exporting

    n = export_results(s, job_id, out_file, actor=terminal_user(), in_domain_only=in_domain_only)
    ok(f"wrote {n} rows to {out_file}")
