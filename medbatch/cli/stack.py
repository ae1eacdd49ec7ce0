"""Running medbatch's parts: the whole embedded stack, or one part in the foreground."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
from rich.table import Table

from core.errors import MedbatchError
from medbatch.cli.app import app
from medbatch.cli.common import console, fail, ok, out, settings, stop_event, wait_for_stop
from medbatch.services import stack as stack_service


@app.command(rich_help_panel="Run medbatch")
def up(
    workers: Annotated[int, typer.Option(help="Celery worker processes to start.")] = 1,
    beat: Annotated[
        bool, typer.Option(help="Run celery beat (the lost-job sweeper) in the first worker.")
    ] = True,
    listen: Annotated[
        bool, typer.Option(help="Also run the DICOM listener (`medbatch listen`).")
    ] = False,
    api: Annotated[
        bool, typer.Option(help="Also run the HTTP API and console (`medbatch serve`).")
    ] = True,
) -> None:
    """Start Redis, Triton, workers, the API (and the listener), whatever is not already
    running, and keep them running: a process that exits is restarted with back-off; one that
    keeps exiting stops everything with exit status 2. Ctrl-C (SIGTERM) stops them."""
    s = settings()
    try:
        with stack_service.running_stack(
            s, workers=workers, beat=beat, listener=listen, api=api, report=ok
        ) as stack:
            console.print(
                "[bold]medbatch is up.[/] Submit with `medbatch screen FILE`; `medbatch status` "
                "shows each part; Ctrl-C stops."
            )
            stack.supervise(stop_event())
            console.print("stopping …")
    except MedbatchError as exc:
        raise fail(exc) from exc


@app.command(rich_help_panel="Run medbatch")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Each part of the stack: answering now, pid, up since, restarts, last exit (exit status 1
    when one does not answer)."""
    from medbatch.services.health import stack_status  # the probes: redis, Triton, the database

    st = stack_status(settings())
    if as_json:
        typer.echo(st.model_dump_json(indent=2))
    else:
        table = Table("part", "answering", "state", "pid", "up since", "restarts", "last exit", "")
        for p in st.parts:
            table.add_row(
                p.name,
                "[green]yes[/]" if p.ok else ("[bold red]no[/]" if p.required else "[yellow]no[/]"),
                (p.phase or "-") + (" (not ours)" if p.managed is False else ""),
                str(p.pid or "-"),
                f"{p.up_since:%Y-%m-%d %H:%M:%S}" if p.up_since else "-",
                str(p.restarts),
                p.last_exit or "-",
                p.detail,
            )
        out.print(table)
        if st.queues:
            out.print("waiting: " + ", ".join(f"{q} {n}" for q, n in st.queues.items()))
        when = st.stopped_at or st.supervising_since
        at = f" ({'at' if st.stopped_at else 'since'} {when:%Y-%m-%d %H:%M:%S})" if when else ""
        out.print(f"medbatch up: {st.supervision}{at}" + (f": {st.outcome}" if st.outcome else ""))
        for note in st.notes:
            out.print(f"[yellow]{note}[/]")
    if not st.all_answering:
        raise typer.Exit(code=1)


@app.command(rich_help_panel="Run medbatch")
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = "",
    concurrency: Annotated[int, typer.Option(help="Processes.")] = 0,
    beat: Annotated[bool, typer.Option(help="Also run celery beat in this worker.")] = False,
    name: Annotated[str, typer.Option(help="Node name; default medbatch-<queues>@<host>.")] = "",
) -> None:
    """Run a Celery worker in the foreground (replaces this process)."""
    argv = stack_service.worker_command(
        settings(),
        queues=[q for q in queues.split(",") if q],
        concurrency=concurrency,
        beat=beat,
        name=name,
    )
    os.execv(argv[0], argv)


@app.command(rich_help_panel="Run medbatch")
def triton() -> None:
    """Run the Triton server from the nvidia-pytriton wheel on triton_models/ (foreground)."""
    try:
        argv, env = stack_service.triton_command(settings())
    except MedbatchError as exc:
        raise fail(exc) from exc
    os.execve(argv[0], argv, env)


@app.command(rich_help_panel="Run medbatch")
def sweep() -> None:
    """Re-publish open jobs whose message is missing from the broker (beat runs this too)."""
    report = stack_service.sweep_once(settings())
    out.print(
        f"closed {len(report.studies_closed)} quiet studies; "
        f"re-published {len(report.republished)} jobs; "
        f"failed {len(report.failed_ingests)} abandoned ingests"
    )


@app.command(rich_help_panel="Run medbatch")
def health(
    what: Annotated[str, typer.Argument(help="beat: the sweeper ran recently.")] = "beat",
    max_age: Annotated[float, typer.Option(help="Seconds.")] = 300.0,
) -> None:
    """Container health checks (exit 0 when healthy)."""
    if what != "beat":
        raise fail(ValueError(f"unknown health check {what!r}"))
    age = stack_service.sweeper_age_s(settings())
    if age > max_age:
        raise fail(RuntimeError(f"the sweeper last ran {age:.0f} s ago (limit {max_age:.0f} s)"))
    out.print(f"sweeper ran {age:.0f} s ago")


@app.command(rich_help_panel="Run medbatch")
def listen() -> None:
    """Run the DICOM listener (C-ECHO, C-STORE) in the foreground until SIGTERM/Ctrl-C."""
    s = settings()
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO names peers' objects
    try:
        listener = stack_service.start_listener(s)
    except MedbatchError as exc:
        raise fail(exc) from exc
    console.print(
        f"[bold]listening[/] as {s.dicom_ae_title} on {s.dicom_bind_address}:{listener.port}; "
        f"studies complete after {s.dicom_quiet_period_s:g} s without a new instance"
    )
    wait_for_stop()
    listener.stop()


@app.command(rich_help_panel="Run medbatch")
def serve() -> None:
    """Run the HTTP API and the operator console in the foreground (MEDBATCH_API_BIND_ADDRESS,
    MEDBATCH_API_PORT; HTTPS with MEDBATCH_API_TLS_CERT/_KEY)."""
    from medbatch.api.server import serve as run

    s = settings()
    console.print(f"[bold]serving[/] the API and console at {s.api_url}/")
    try:
        run(s)
    except MedbatchError as exc:
        raise fail(exc) from exc
