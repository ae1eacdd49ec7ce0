"""The ``medbatch`` command: a thin layer over ingest/, workers/, db/ and the embedded stack."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from medbatch.errors import MedbatchError
from medbatch.settings import REPO_ROOT, Settings, get_settings

app = typer.Typer(
    no_args_is_help=True, help="medbatch: batch inference for PACS, EHR and compound libraries."
)
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
console = Console(stderr=True)
out = Console()

SAMPLE_LIBRARY = REPO_ROOT / "samples" / "library.smi"


def _settings() -> Settings:
    s = get_settings()
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return s


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


def _wait_for_stop_signal() -> None:
    """Block until SIGTERM (docker stop, systemd) or SIGINT (Ctrl-C)."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        time.sleep(0.2)


# --- the stack -------------------------------------------------------------------------------
@app.command()
def up(
    workers: Annotated[int, typer.Option(help="Celery worker processes to start.")] = 1,
    beat: Annotated[
        bool, typer.Option(help="Run celery beat (the lost-job sweeper) in the first worker.")
    ] = True,
    listen: Annotated[
        bool, typer.Option(help="Also run the DICOM listener (`medbatch listen`).")
    ] = False,
) -> None:
    """Start Redis, Triton and workers (whatever is not already running); stop them on Ctrl-C."""
    from medbatch.stack.embedded import EmbeddedStack

    s = _settings()
    try:
        with EmbeddedStack(
            s,
            workers=workers,
            beat=beat,
            listener=listen,
            report=lambda m: console.print(f"[green]✓[/] {m}"),
        ):
            console.print(
                "[bold]medbatch is up.[/] Submit with `medbatch screen FILE`; Ctrl-C stops."
            )
            _wait_for_stop_signal()
            console.print("stopping …")
    except MedbatchError as exc:
        raise _fail(exc) from exc


@app.command()
def demo(
    library: Annotated[Path, typer.Argument(help="Library to screen.")] = SAMPLE_LIBRARY,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the results.")] = Path(
        "var/demo-results.csv"
    ),
) -> None:
    """The main job end to end on the embedded defaults: up, screen a library, export, down."""
    from db import audit
    from db.session import session_scope
    from medbatch.reports.screening import render_screening_report
    from medbatch.stack.embedded import EmbeddedStack

    s = _settings()
    try:
        with EmbeddedStack(
            s, workers=1, beat=True, report=lambda m: console.print(f"[green]✓[/] {m}")
        ):
            job_id = _screen(s, library, wait=True, timeout=1800)
            _export(s, job_id, out_file)
            report_file = out_file.with_suffix(".html")
            with session_scope(s.database_url) as session:
                render_screening_report(session, job_id, report_file, actor=audit.current_actor())
            console.print(f"[green]✓[/] wrote {report_file}: open it in a browser")
    except MedbatchError as exc:
        raise _fail(exc) from exc


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = "",
    concurrency: Annotated[int, typer.Option(help="Processes.")] = 0,
    beat: Annotated[bool, typer.Option(help="Also run celery beat in this worker.")] = False,
    name: Annotated[str, typer.Option(help="Node name; default medbatch-<queues>@<host>.")] = "",
) -> None:
    """Run a Celery worker in the foreground (replaces this process)."""
    from medbatch.stack.worker_process import worker_argv

    s = _settings()
    qs = (
        queues.split(",")
        if queues
        else [s.queue_chem, s.queue_dicom, s.queue_ehr, s.queue_maintenance]
    )
    node = name or f"medbatch-{'-'.join(qs)}@%h"
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # pool children's metrics go here
        metrics_dir = s.storage_dir.resolve() / "prometheus" / node.split("@")[0]
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    argv = worker_argv(
        qs, concurrency or s.worker_concurrency, node, beat=beat, state_dir=s.storage_dir
    )
    os.execv(argv[0], argv)


@app.command()
def triton() -> None:
    """Run the Triton server from the nvidia-pytriton wheel on triton_models/ (foreground)."""
    from medbatch.stack.triton_server import server_env, triton_argv

    s = _settings()
    try:
        argv = triton_argv(s, s.storage_dir.resolve())
    except MedbatchError as exc:
        raise _fail(exc) from exc
    os.execve(argv[0], argv, server_env())


@app.command()
def sweep() -> None:
    """Re-publish open jobs whose message is missing from the broker (beat runs this too)."""
    from workers.sweeper import sweep as run_sweep

    report = run_sweep(_settings())
    out.print(
        f"closed {len(report.studies_closed)} quiet studies; "
        f"re-published {len(report.republished)} jobs; "
        f"failed {len(report.failed_ingests)} abandoned ingests"
    )


@app.command()
def health(
    what: Annotated[str, typer.Argument(help="beat: the sweeper ran recently.")] = "beat",
    max_age: Annotated[float, typer.Option(help="Seconds.")] = 300.0,
) -> None:
    """Container health checks (exit 0 when healthy)."""
    import redis

    from workers.sweeper import HEARTBEAT_KEY

    s = _settings()
    if what != "beat":
        raise _fail(ValueError(f"unknown health check {what!r}"))
    last = redis.Redis.from_url(s.broker_url).get(HEARTBEAT_KEY)
    age = time.time() - float(last) if last else float("inf")
    if age > max_age:
        raise _fail(RuntimeError(f"the sweeper last ran {age:.0f} s ago (limit {max_age:.0f} s)"))
    out.print(f"sweeper ran {age:.0f} s ago")


# --- PACS push -------------------------------------------------------------------------------
@app.command()
def listen() -> None:
    """Run the DICOM listener (C-ECHO, C-STORE) in the foreground until SIGTERM/Ctrl-C."""
    from db.migrate import upgrade
    from ingest.dicom.listener import Listener
    from workers.dispatch import publish

    s = _settings()
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO names peers' objects
    try:
        upgrade(s.database_url)
        listener = Listener(s, publish)
        listener.start()
    except MedbatchError as exc:
        raise _fail(exc) from exc
    console.print(
        f"[bold]listening[/] as {s.dicom_ae_title} on {s.dicom_bind_address}:{listener.port}; "
        f"studies complete after {s.dicom_quiet_period_s:g} s without a new instance"
    )
    _wait_for_stop_signal()
    listener.stop()


@app.command("demo-pacs")
def demo_pacs(
    work: Annotated[Path, typer.Option(help="Where studies, results and pictures go.")] = Path(
        "var/pacs-demo"
    ),
) -> None:
    """PACS push end to end: two synthetic chest CTs pushed to the listener, scored, and the
    SR + key image sent back to a demo PACS; key images written as PNG."""
    from medbatch import pacs_demo
    from medbatch.stack.embedded import EmbeddedStack

    s = pacs_demo.demo_settings(_settings())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ok = lambda m: console.print(f"[green]✓[/] {m}")  # noqa: E731
    try:
        with EmbeddedStack(s, workers=1, beat=True, listener=True, report=ok):
            server = pacs_demo.start_demo_pacs(s, work / "pacs")
            try:
                results = pacs_demo.run(s, work, ok)
            finally:
                server.shutdown()
    except MedbatchError as exc:
        raise _fail(exc) from exc
    table = Table("study", "state", "p(nodule-like lesion)", "objects at PACS", "key image")
    for r in results:
        table.add_row(
            r.label,
            r.state,
            f"{r.probability:.3f}" if r.probability is not None else "-",
            str(r.received),
            r.key_png.name if r.key_png else "-",
        )
    out.print(table)
    out.print(f"Key images (PNG) and what the demo PACS received are in {work}.")
    out.print("Reference model on synthetic data: not for clinical use.")


@app.command("demo-ehr")
def demo_ehr(
    patients: Annotated[int, typer.Option(help="Synthetic patients in the extract.")] = 3000,
    work: Annotated[Path, typer.Option(help="Where the extract and outputs go.")] = Path(
        "var/demo-ehr"
    ),
    fmt: Annotated[
        str, typer.Option("--format", help="long (a CSV extract) or fhir (a $export folder).")
    ] = "long",
) -> None:
    """Nightly EHR scoring end to end: a synthetic extract with broken rows is scored by both
    models; results CSV, an HTML report with attention per patient, and AUROC vs the truth."""
    from db import audit
    from db.session import session_scope
    from medbatch.ehr_command import submit_and_follow, summary_table, truth_check
    from medbatch.reports.ehr import render_ehr_report
    from medbatch.stack.embedded import EmbeddedStack
    from medbatch.synth.ehr import SynthStats, write_long_csv

    s = _settings()
    ok = lambda m: console.print(f"[green]✓[/] {m}")  # noqa: E731
    work.mkdir(parents=True, exist_ok=True)
    if fmt not in ("long", "fhir"):
        raise _fail(ValueError(f"unknown format {fmt!r}; choose long or fhir"))
    stats: SynthStats
    if fmt == "fhir":
        from medbatch.synth.ehr_fhir import write_fhir_export

        extract = work / "export"
        stats = write_fhir_export(extract, patients, seed=2026, messiness=0.02)
    else:
        extract = work / "extract.csv"
        stats = write_long_csv(extract, patients, seed=2026, messiness=0.02)
    ok(f"wrote {extract}: {stats.rows:,} rows, {stats.broken_rows:,} of them broken on purpose")
    try:
        with EmbeddedStack(s, workers=1, beat=True, report=ok):
            job_id = submit_and_follow(
                s, extract.resolve(), console, force=False, wait=True, timeout=3600
            )
            out.print(summary_table(s, job_id))
            _export(s, job_id, work / "results.csv")
            with session_scope(s.database_url) as session:
                render_ehr_report(
                    session, job_id, work / "report.html", actor=audit.current_actor()
                )
            ok(f"wrote {work / 'report.html'}: open it in a browser")
    except MedbatchError as exc:
        raise _fail(exc) from exc
    for model, value in truth_check(s, job_id, stats.truth_path).items():
        shown = "n/a" if value is None else f"{value:.3f}"
        out.print(f"AUROC of {model} against the generator's ground truth: {shown}")
    out.print("Reference models on synthetic data: not for clinical use.")


@app.command()
def studies(
    limit: Annotated[int, typer.Option(help="Newest studies to list.")] = 20,
) -> None:
    """Received DICOM studies: instances, result versions and the newest result of each."""
    from db import audit
    from db.models import DicomResult, DicomStudy
    from db.session import session_scope

    s = _settings()
    with session_scope(s.database_url) as session:
        audit.append(session, actor=audit.current_actor(), action="studies.read", subject="*")
        table = Table("study", "from AE", "instances", "open", "versions", "p(lesion)", "last")
        for study in session.scalars(
            select(DicomStudy).order_by(DicomStudy.id.desc()).limit(limit)
        ):
            newest = session.scalars(
                select(DicomResult)
                .where(DicomResult.study_id == study.id)
                .order_by(DicomResult.version.desc())
                .limit(1)
            ).first()
            table.add_row(
                str(study.id),
                study.calling_ae,
                str(study.instance_count),
                "yes" if study.open else "no",
                str(study.version),
                f"{newest.study_probability:.3f} (v{newest.version})" if newest else "-",
                f"{study.last_instance_at:%Y-%m-%d %H:%M:%S}",
            )
        out.print(table)


# --- EHR -------------------------------------------------------------------------------------
@app.command("synth-ehr")
def synth_ehr(
    out_file: Annotated[
        Path, typer.Argument(help="The extract to write (.csv; a folder for --format fhir).")
    ],
    patients: Annotated[int, typer.Option(help="Patients to generate.")] = 1000,
    seed: Annotated[int, typer.Option(help="Same seed, same file (byte for byte).")] = 0,
    fmt: Annotated[
        str, typer.Option("--format", help="long, wide, or fhir (a Bulk Data $export folder).")
    ] = "long",
    messiness: Annotated[
        float, typer.Option(help="Share of broken rows (typos, bad units, impossible values).")
    ] = 0.02,
) -> None:
    """Write a deterministic synthetic EHR extract (+ ground-truth and defect sidecars)."""
    from medbatch.synth.ehr import synth_ehr_command

    try:
        stats = synth_ehr_command(out_file, patients, seed, fmt, messiness)
    except ValueError as exc:
        raise _fail(exc) from exc
    broken = ", ".join(f"{k} {v}" for k, v in sorted(stats.broken.items()) if v) or "none"
    console.print(
        f"[green]✓[/] {stats.path}: {stats.rows} rows for {stats.patients} patients "
        f"({stats.valid_rows} valid; broken: {broken}); truth in {stats.truth_path}"
    )


# --- screening -------------------------------------------------------------------------------
def _screen(s: Settings, library: Path, *, wait: bool, timeout: float, **opts: object) -> int:
    from db.migrate import upgrade
    from ingest.chem.submit import ScreenOptions, submit_library
    from medbatch.stack.redis_server import ping
    from workers.dispatch import publish

    upgrade(s.database_url)
    if not ping(s.broker_url):
        raise MedbatchError(
            f"Redis at {s.broker_url} does not answer; start the stack with `medbatch up`"
        )
    options = ScreenOptions(**opts)  # type: ignore[arg-type]
    size = library.stat().st_size if library.is_file() else 0
    with Progress(
        TextColumn("[bold]reading[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[rows]} rows"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal and os.environ.get("CI") == "true",
    ) as bar:
        task = bar.add_task(library.name, total=max(size, 1), rows=0)
        result = submit_library(
            library,
            s,
            publish,
            options,
            progress=lambda done, rows: bar.update(task, completed=done, rows=rows),
        )
        bar.update(task, completed=max(size, 1))
    if result.existing:
        console.print(
            f"[yellow]this file was already submitted as job {result.job_id}; not rescored[/] "
            "(use --force)"
        )
    if wait:
        if not _consumers(s.queue_chem):
            console.print(
                f"[yellow]no worker consumes the '{s.queue_chem}' queue right now[/]: the job is "
                "stored and queued, and runs when one starts (`medbatch up` or `medbatch worker`)"
            )
        _wait_for(s, result.job_id, timeout)
    _print_summary(s, result.job_id)
    return result.job_id


def _consumers(queue: str) -> list[str]:
    """Names of the workers consuming ``queue`` (asked over the broker, one second at most)."""
    from workers.celery_app import app as celery_app

    replies = celery_app.control.inspect(timeout=1.0).active_queues() or {}
    return [name for name, queues in replies.items() if any(q["name"] == queue for q in queues)]


def _wait_for(s: Settings, job_id: int, timeout: float) -> None:
    from db.models import TERMINAL_STATES, Job, JobState
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]scoring[/] job {task.fields[job]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("score", total=None, job=job_id)
        while True:
            with session_scope(s.database_url) as session:
                parent = session.get(Job, job_id)
                rows = session.execute(
                    select(Job.state, func.count())
                    .where(Job.parent_id == job_id)
                    .group_by(Job.state)
                ).all()
            total = sum(n for _, n in rows)
            finished = sum(n for st, n in rows if JobState(st) in TERMINAL_STATES)
            bar.update(task, total=total or 1, completed=finished if total else 1)
            if parent is None or JobState(parent.state) in TERMINAL_STATES:
                return
            if time.monotonic() > deadline:
                raise MedbatchError(
                    f"job {job_id} not finished after {timeout:.0f} s; "
                    f"`medbatch jobs {job_id}` shows it"
                )
            time.sleep(0.5)


def _print_summary(s: Settings, job_id: int) -> None:
    from db.models import Job, Prediction
    from db.session import session_scope

    with session_scope(s.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        scored_now = session.scalar(
            select(func.count())
            .select_from(Prediction)
            .join(Job, Job.id == Prediction.job_id)
            .where(Job.parent_id == job_id)
        )
        c = dict(job.summary or {})
        table = Table(title=f"job {job_id}: {job.source} — {job.state}", show_header=False)
        for label, value in [
            ("rows read", c.get("rows", 0)),
            ("valid molecules", c.get("valid", 0)),
            ("rejected rows", c.get("rejected", 0)),
            ("duplicates in file", c.get("duplicates", 0)),
            ("already scored earlier", c.get("already_scored", 0)),
            ("scored in this job", scored_now),
            ("chunks", c.get("chunks", 0)),
        ]:
            table.add_row(label, str(value))
        if job.error:
            table.add_row("error", job.error)
    out.print(table)


@app.command()
def screen(
    library: Annotated[
        Path,
        typer.Argument(
            help=".smi, .csv, .tsv or .sdf, optionally .gz", exists=True, dir_okay=False
        ),
    ],
    smiles_column: Annotated[str, typer.Option(help="CSV/TSV column holding SMILES.")] = "smiles",
    id_column: Annotated[
        str | None, typer.Option(help="CSV column or SDF property naming each record.")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="smi, csv, tsv or sdf (default: from the suffix)."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Rescore even if this file or these molecules were scored.")
    ] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Molecules per Triton request.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for scoring to finish.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 3600.0,
) -> None:
    """Queue a compound library for screening, show progress, print scored/rejected/duplicates."""
    s = _settings()
    try:
        _screen(
            s,
            library,
            wait=wait,
            timeout=timeout,
            fmt=fmt,
            smiles_column=smiles_column,
            id_column=id_column,
            force=force,
            chunk_size=chunk_size,
        )
    except MedbatchError as exc:
        raise _fail(exc) from exc


@app.command()
def ehr(
    extract: Annotated[
        Path,
        typer.Argument(
            help="A long (patient_id,timestamp,variable,value,unit) or wide CSV extract, or a "
            "FHIR Bulk Data $export (folder, .zip or .tar of NDJSON files).",
            exists=True,
            dir_okay=True,
        ),
    ],
    force: Annotated[bool, typer.Option(help="Score again even if this content was.")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the ingest and scoring to the end.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 6 * 3600.0,
) -> None:
    """Score an EHR extract: every valid patient gets risks and explanations, every bad row a
    reason. The same content is scored once, whatever the file is called."""
    from medbatch.ehr_command import submit_and_follow, summary_table

    s = _settings()
    try:
        job_id = submit_and_follow(
            s, extract.resolve(), console, force=force, wait=wait, timeout=timeout
        )
        out.print(summary_table(s, job_id))
    except MedbatchError as exc:
        raise _fail(exc) from exc


@app.command()
def jobs(
    job_id: Annotated[int | None, typer.Argument(help="Show one job and its chunks.")] = None,
    limit: Annotated[int, typer.Option(help="Newest jobs to list.")] = 20,
) -> None:
    """Job status: the newest top-level jobs, or one job with its chunks."""
    from db import audit
    from db.jobs import child_state_counts, get_job
    from db.models import Job
    from db.session import session_scope

    s = _settings()
    try:
        with session_scope(s.database_url) as session:
            audit.append(
                session,
                actor=audit.current_actor(),
                action="jobs.read",
                subject=f"job:{job_id or '*'}",
            )
            if job_id is not None:
                job = get_job(session, job_id)
                table = Table(title=f"job {job.id}", show_header=False)
                for field in (
                    "kind",
                    "source",
                    "state",
                    "attempts",
                    "error",
                    "created_at",
                    "queued_at",
                    "started_at",
                    "finished_at",
                ):
                    table.add_row(field, str(getattr(job, field)))
                table.add_row("summary", str(job.summary))
                table.add_row("chunks", str(child_state_counts(session, job.id)))
                out.print(table)
                return
            table = Table("id", "kind", "source", "state", "items", "attempts", "created", "error")
            for job in session.scalars(
                select(Job).where(Job.parent_id.is_(None)).order_by(Job.id.desc()).limit(limit)
            ):
                table.add_row(
                    str(job.id),
                    job.kind,
                    job.source,
                    job.state,
                    str(job.item_count),
                    str(job.attempts),
                    f"{job.created_at:%Y-%m-%d %H:%M:%S}",
                    (job.error or "")[:60],
                )
            out.print(table)
    except MedbatchError as exc:
        raise _fail(exc) from exc


def _export(s: Settings, job_id: int, out_file: Path) -> None:
    from db import audit
    from db.exports import export_results
    from db.session import session_scope

    with session_scope(s.database_url) as session:
        n = export_results(session, job_id, out_file, actor=audit.current_actor())
    console.print(f"[green]✓[/] wrote {n} rows to {out_file}")


@app.command()
def results(
    job_id: Annotated[
        int, typer.Argument(help="A screening or EHR extract job id (see `medbatch jobs`).")
    ],
    out_file: Annotated[Path, typer.Option("--out", help="file.csv or file.parquet")],
) -> None:
    """Export results: a screening job's, one row per line of the file; an EHR extract's, one
    row per scored patient (every model side by side) and one per rejected line."""
    try:
        _export(_settings(), job_id, out_file)
    except MedbatchError as exc:
        raise _fail(exc) from exc


@app.command()
def report(
    job_id: Annotated[
        int, typer.Argument(help="A screening or EHR extract job id (see `medbatch jobs`).")
    ],
    out_file: Annotated[Path, typer.Option("--out", help="report.html")],
    patient: Annotated[
        list[str] | None,
        typer.Option(help="EHR: draw this patient's attention over visits (repeatable)."),
    ] = None,
) -> None:
    """An HTML report. Screening: counts, the logS histogram, structures at both ends, rejected
    rows. EHR: counts, risk distributions, attention over visits per patient, rejected rows."""
    from db import audit
    from db.jobs import get_job
    from db.models import JobKind
    from db.session import session_scope
    from medbatch.reports.ehr import render_ehr_report
    from medbatch.reports.screening import render_screening_report

    s = _settings()
    try:
        with session_scope(s.database_url) as session:
            if get_job(session, job_id).kind == JobKind.EHR_EXTRACT.value:
                render_ehr_report(
                    session, job_id, out_file, actor=audit.current_actor(), patients=patient
                )
            else:
                render_screening_report(session, job_id, out_file, actor=audit.current_actor())
    except MedbatchError as exc:
        raise _fail(exc) from exc
    console.print(f"[green]✓[/] wrote {out_file}")


@app.command()
def retry(
    job_id: Annotated[
        int,
        typer.Argument(
            help="A failed chunk, study or send job, or a screening job to retry its chunks."
        ),
    ],
) -> None:
    """Re-queue failed jobs (after fixing what made them fail)."""
    from db import audit
    from db.jobs import retry_failed
    from db.models import Job
    from db.session import session_scope
    from workers.dispatch import publish

    s = _settings()
    try:
        with session_scope(s.database_url) as session:
            requeued = retry_failed(session, job_id, actor=audit.current_actor())
            kinds = {i: session.get_one(Job, i).kind for i in requeued}
    except MedbatchError as exc:
        raise _fail(exc) from exc
    for i, kind in kinds.items():
        publish(i, kind)
    out.print(f"re-queued {len(requeued)} job(s)")


# --- audit and schema ------------------------------------------------------------------------
@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit hash chain; name the first broken link (exit 1 if broken)."""
    from db.audit import verify_chain
    from db.session import session_scope

    s = _settings()
    with session_scope(s.database_url) as session:
        report = verify_chain(session)
    if report.ok:
        out.print(f"[green]audit chain intact[/]: {report.events} events verified")
        return
    out.print(
        f"[bold red]audit chain broken at event {report.broken_seq}[/]: {report.reason} "
        f"({report.events} events verified before it)"
    )
    raise typer.Exit(code=1)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply Alembic migrations."""
    from db.migrate import upgrade

    s = _settings()
    upgrade(s.database_url, revision)
    out.print(f"database at {revision}")


if __name__ == "__main__":
    app()
