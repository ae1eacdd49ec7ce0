"""Compound libraries: screen one, or run the whole demo."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, TextColumn
from rich.table import Table

from core.errors import MedbatchError
from core.served_models import IN_DOMAIN
from core.settings import REPO_ROOT
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
    wait_with_progress,
)

if TYPE_CHECKING:
    from core.settings import Settings
    from medbatch.services.screening import ScreenOptions

SAMPLE_LIBRARY = REPO_ROOT / "samples" / "library.smi"


def screen_and_show(
    s: Settings, library: Path, options: ScreenOptions, *, wait: bool, timeout: float
) -> int:
    """Submit with a reading bar, optionally follow the scoring, print the summary."""
    from medbatch.services.screening import screening_summary, submit_library
    from medbatch.services.stack import queue_consumers

    size = library.stat().st_size if library.is_file() else 0
    with progress(
        TextColumn("[bold]reading[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[rows]} rows"),
    ) as bar:
        task = bar.add_task(library.name, total=max(size, 1), rows=0)
        result = submit_library(
            s,
            library,
            options,
            actor=terminal_user(),
            progress=lambda done, rows: bar.update(task, completed=done, rows=rows),
        )
        bar.update(task, completed=max(size, 1))
    if result.existing:
        console.print(
            f"[yellow]this file was already submitted as job {result.job_id}; not rescored[/] "
            "(use --force)"
        )
    if wait:
        if not queue_consumers(s.queue_chem):
            console.print(
                f"[yellow]no worker consumes the '{s.queue_chem}' queue right now[/]: the job is "
                "stored and queued, and runs when one starts (`medbatch up` or `medbatch worker`)"
            )
        wait_with_progress(s, result.job_id, timeout)
    summary = screening_summary(s, result.job_id)
    table = Table(
        title=f"job {summary.job_id}: {summary.source} — {summary.state}", show_header=False
    )
    for label, value in [
        ("rows read", summary.rows),
        ("valid molecules", summary.valid),
        ("rejected rows", summary.rejected),
        ("duplicates in file", summary.duplicates),
        ("already scored earlier", summary.already_scored),
        ("scored in this job", summary.scored_now),
        ("chunks", summary.chunks),
    ]:
        table.add_row(label, str(value))
    if summary.out_of_domain is not None:
        table.add_row(
            "out of domain (scored, flagged)",
            f"[yellow]{summary.out_of_domain}[/]" if summary.out_of_domain else "0",
        )
    if summary.error:
        table.add_row("error", summary.error)
    out.print(table)
    return result.job_id


@app.command(rich_help_panel="Compound libraries")
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
    from medbatch.services.screening import ScreenOptions

    options = ScreenOptions(
        fmt=fmt,  # type: ignore[arg-type]
        smiles_column=smiles_column,
        id_column=id_column,
        force=force,
        chunk_size=chunk_size,
    )
    try:
        screen_and_show(settings(), library, options, wait=wait, timeout=timeout)
    except MedbatchError as exc:
        raise fail(exc) from exc


@app.command(rich_help_panel="Compound libraries")
def demo(
    library: Annotated[Path, typer.Argument(help="Library to screen.")] = SAMPLE_LIBRARY,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the results.")] = Path(
        "var/demo-results.csv"
    ),
) -> None:
    """The main job end to end on the embedded defaults: up, screen a library, export, down."""
    from medbatch.services.reports import render_report
    from medbatch.services.screening import ScreenOptions
    from medbatch.services.stack import running_stack

    s = settings()
    try:
        with running_stack(s, workers=1, beat=True, api=True, report=ok):
            job_id = screen_and_show(s, library, ScreenOptions(), wait=True, timeout=1800)
            export(s, job_id, out_file)
            report_file = out_file.with_suffix(".html")
            render_report(s, job_id, report_file, actor=terminal_user())
            ok(f"wrote {report_file}: open it in a browser")
    except MedbatchError as exc:
        raise fail(exc) from exc


@app.command(rich_help_panel="Compound libraries")
def explain(
    smiles: Annotated[str, typer.Argument(help="The molecule, as SMILES.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the similarity map here (.png).")
    ] = None,
    top: Annotated[int, typer.Option(help="Atoms listed, by largest contribution.")] = 8,
) -> None:
    """Score one molecule: logS, its spread and calibrated interval, the applicability domain,
    and each atom's contribution (drawn as an RDKit similarity map with --out)."""
    from medbatch.services.explain import explain_molecule  # RDKit, the Triton client

    try:
        found = explain_molecule(settings(), smiles, actor=terminal_user())
    except MedbatchError as exc:
        raise fail(exc) from exc
    table = Table(title=f"{found.smiles} ({found.model_name} v{found.model_version})")
    table.add_column("field")
    table.add_column("value")
    for name, value in found.values.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        if name == IN_DOMAIN and value is False:
            shown = f"[yellow]{shown}[/]"
        table.add_row(name, shown)
    out.print(table)
    atoms = Table(title="atom contributions (logS units; + raises solubility)")
    atoms.add_column("atom", justify="right")
    atoms.add_column("element")
    atoms.add_column("contribution", justify="right")
    for a in sorted(found.atoms, key=lambda a: -abs(a.contribution))[:top]:
        atoms.add_row(str(a.index), a.symbol, f"{a.contribution:+.3f}")
    out.print(atoms)
    if out_file is not None:
        if out_file.suffix.lower() != ".png":
            raise fail(MedbatchError(f"{out_file.name}: the similarity map is written as .png"))
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_bytes(found.png)
        ok(f"wrote {out_file}")
