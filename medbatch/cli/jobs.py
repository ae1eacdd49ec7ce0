"""Jobs and their results: status, exports, reports, retries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from core.errors import MedbatchError
from medbatch.cli.app import app
from medbatch.cli.common import export, fail, ok, out, settings, terminal_user

#: The job whose results are exported or reported.
ResultsJob = Annotated[
    int, typer.Argument(help="A screening or EHR extract job id (see `medbatch jobs`).")
]


@app.command(rich_help_panel="Jobs and results")
def jobs(
    job_id: Annotated[int | None, typer.Argument(help="Show one job and its chunks.")] = None,
    limit: Annotated[int, typer.Option(help="Newest jobs to list.")] = 20,
) -> None:
    """Job status: the newest top-level jobs, or one job with its chunks."""
    from medbatch.services import jobs as job_service

    s = settings()
    try:
        if job_id is not None:
            job = job_service.show_job(s, job_id, actor=terminal_user())
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
            table.add_row("chunks", str(job.children))
            out.print(table)
            return
        table = Table("id", "kind", "source", "state", "items", "attempts", "created", "error")
        for job in job_service.list_jobs(s, actor=terminal_user(), limit=limit):
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
        raise fail(exc) from exc


@app.command(rich_help_panel="Jobs and results")
def results(
    job_id: ResultsJob,
    out_file: Annotated[Path, typer.Option("--out", help="file.csv or file.parquet")],
    in_domain_only: Annotated[
        bool,
        typer.Option(
            "--in-domain-only", help="Screening: only molecules inside the model's domain."
        ),
    ] = False,
) -> None:
    """Export results: a screening job's, one row per line of the file; an EHR extract's, one
    row per scored patient (every model side by side) and one per rejected line."""
    try:
        export(settings(), job_id, out_file, in_domain_only=in_domain_only)
    except MedbatchError as exc:
        raise fail(exc) from exc


@app.command(rich_help_panel="Jobs and results")
def report(
    job_id: ResultsJob,
    out_file: Annotated[Path, typer.Option("--out", help="report.html")],
    patient: Annotated[
        list[str] | None,
        typer.Option(help="EHR: draw this patient's attention over visits (repeatable)."),
    ] = None,
) -> None:
    """An HTML report. Screening: counts, the logS histogram, structures at both ends, rejected
    rows. EHR: counts, risk distributions, attention over visits per patient, rejected rows."""
    from medbatch.services.reports import render_report

    try:
        render_report(settings(), job_id, out_file, actor=terminal_user(), patients=patient)
    except MedbatchError as exc:
        raise fail(exc) from exc
    ok(f"wrote {out_file}")


@app.command(rich_help_panel="Jobs and results")
def retry(
    job_id: Annotated[
        int,
        typer.Argument(
            help="A failed chunk, study or send job, or a screening job to retry its chunks."
        ),
    ],
) -> None:
    """Re-queue failed jobs (after fixing what made them fail)."""
    from medbatch.services.jobs import retry_job

    try:
        requeued = retry_job(settings(), job_id, actor=terminal_user())
    except MedbatchError as exc:
        raise fail(exc) from exc
    out.print(f"re-queued {len(requeued)} job(s)")
