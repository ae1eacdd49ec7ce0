"""EHR extracts: score one, write a synthetic one, or run the nightly demo end to end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, TaskID, TextColumn
from rich.table import Table

from core.errors import MedbatchError
from medbatch.cli.app import app
from medbatch.cli.common import (
    console,
    export,
    fail,
    ok,
    out,
    progress,
    settings,
    terminal_user,
)

if TYPE_CHECKING:
    from core.settings import Settings

#: Seconds between polls while following an extract: the command returns at most this long
#: after the extract ends. Each poll is one SELECT (extract_progress), so ten a second.
POLL_S = 0.1


def follow(s: Settings, extract_id: int, timeout: float) -> None:
    """Progress bars for the ingest (bytes) and the scoring (batches) until the extract ends."""
    from medbatch.services.ehr import extract_progress

    deadline = time.monotonic() + timeout
    with progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[note]}")
    ) as bars:
        reading = bars.add_task("reading", total=None, note="")
        scoring: TaskID | None = None
        while True:
            p = extract_progress(s, extract_id)
            if p.size_bytes:
                bars.update(
                    reading,
                    total=max(p.size_bytes, 1),
                    completed=p.size_bytes if p.ingest_done else p.bytes_read,
                    note=f"{p.bytes_read / 1e6:,.0f} MB · {p.accepted_rows:,} rows, "
                    f"{p.rejected_rows:,} rejected",
                )
            if p.batches_total:
                total, done = p.batches_total, p.batches_finished
                if scoring is None:
                    scoring = bars.add_task("scoring", total=total, note="batches")
                bars.update(scoring, total=total, completed=done, note=f"{done}/{total} batches")
            if p.terminal:
                return
            if time.monotonic() > deadline:
                raise MedbatchError(
                    f"job {extract_id} not finished after {timeout:.0f} s; "
                    f"`medbatch jobs {extract_id}` shows it"
                )
            time.sleep(POLL_S)


def summary_table(s: Settings, extract_id: int) -> Table:
    from medbatch.services.ehr import extract_summary

    c = extract_summary(s, extract_id)
    table = Table(title=f"EHR extract job {c.job_id}: {c.source} — {c.state}", show_header=False)
    table.add_row("measurements accepted", f"{c.accepted_rows:,}")
    table.add_row("rows rejected", f"{c.rejected_rows:,}")
    for kind, n in sorted(c.rejected_by_kind.items()):
        table.add_row(f"  {kind.replace('_', ' ')}", f"{n:,}")
    for reason, n in c.skipped.items():  # FHIR: not results, not errors
        table.add_row(f"skipped: {reason}", f"{n:,}")
    if c.unknown_codes:
        shown = ", ".join(f"{code} ×{n:,}" for code, n in list(c.unknown_codes.items())[:5])
        table.add_row("observations of codes no model uses", shown)
    table.add_row("patients scored", f"{c.patients_scored:,}")
    table.add_row("out-of-distribution profiles", f"{c.out_of_distribution:,}")
    table.add_row("scoring batches", str(c.batches))
    if c.error:
        table.add_row("error", c.error)
    return table


def submit_and_follow(s: Settings, path: Path, *, force: bool, wait: bool, timeout: float) -> int:
    from medbatch.services.ehr import submit_extract

    console.print(f"hashing {path.name} …")
    result = submit_extract(s, path, force=force, actor=terminal_user())
    if result.existing:
        console.print(
            f"[yellow]this extract's content was already submitted as job {result.job_id}; "
            "not rescored[/] (use --force)"
        )
    elif wait:
        follow(s, result.job_id, timeout)
    return result.job_id


@app.command(rich_help_panel="EHR extracts")
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
    s = settings()
    try:
        job_id = submit_and_follow(s, extract.resolve(), force=force, wait=wait, timeout=timeout)
        out.print(summary_table(s, job_id))
    except MedbatchError as exc:
        raise fail(exc) from exc


@app.command("synth-ehr", rich_help_panel="EHR extracts")
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
    from medbatch.synth.command import synth_ehr_command

    try:
        stats = synth_ehr_command(out_file, patients, seed, fmt, messiness)
    except ValueError as exc:
        raise fail(exc) from exc
    broken = ", ".join(f"{k} {v}" for k, v in sorted(stats.broken.items()) if v) or "none"
    ok(
        f"{stats.path}: {stats.rows} rows for {stats.patients} patients "
        f"({stats.valid_rows} valid; broken: {broken}); truth in {stats.truth_path}"
    )


@app.command("demo-ehr", rich_help_panel="EHR extracts")
def demo_ehr(
    patients: Annotated[int, typer.Option(help="Synthetic patients in the extract.")] = 3000,
    work: Annotated[Path, typer.Option(help="Where the extract and outputs go.")] = Path(
        "var/demo-ehr"
    ),
    fmt: Annotated[
        str, typer.Option("--format", help="long (a CSV extract) or fhir (a $export folder).")
    ] = "long",
) -> None:
    """Nightly EHR scoring end to end: a synthetic extract with broken rows is scored by every
    EHR model; results CSV, an HTML report with attention per patient, and AUROC vs the truth."""
    from medbatch.services.ehr import truth_auroc
    from medbatch.services.reports import render_report
    from medbatch.services.stack import running_stack
    from medbatch.synth.ehr import SynthStats, write_long_csv

    s = settings()
    work.mkdir(parents=True, exist_ok=True)
    if fmt not in ("long", "fhir"):
        raise fail(ValueError(f"unknown format {fmt!r}; choose long or fhir"))
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
        with running_stack(s, workers=1, beat=True, report=ok):
            job_id = submit_and_follow(s, extract.resolve(), force=False, wait=True, timeout=3600)
            out.print(summary_table(s, job_id))
            export(s, job_id, work / "results.csv")
            render_report(s, job_id, work / "report.html", actor=terminal_user())
            ok(f"wrote {work / 'report.html'}: open it in a browser")
    except MedbatchError as exc:
        raise fail(exc) from exc
    for model, value in truth_auroc(s, job_id, stats.truth_path).items():
        shown = "n/a" if value is None else f"{value:.3f}"
        out.print(f"AUROC of {model} against the generator's ground truth: {shown}")
    out.print("Reference models on synthetic data: not for clinical use.")
