"""PACS push: the received studies, and the PACS demo end to end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from core.errors import MedbatchError
from medbatch.cli.app import app
from medbatch.cli.common import fail, ok, out, settings, terminal_user


@app.command("demo-pacs", rich_help_panel="PACS push")
def demo_pacs(
    work: Annotated[Path, typer.Option(help="Where studies, results and pictures go.")] = Path(
        "var/pacs-demo"
    ),
) -> None:
    """PACS push end to end: two synthetic chest CTs pushed to the listener, scored, and the
    SR + key image sent back to a demo PACS; key images written as PNG."""
    from medbatch.services import pacs_demo  # pynetdicom, pydicom: only for the demo
    from medbatch.services.stack import running_stack

    s = pacs_demo.demo_settings(settings())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        with running_stack(s, workers=1, beat=True, listener=True, report=ok):
            server = pacs_demo.start_demo_pacs(s, work / "pacs")
            try:
                results = pacs_demo.run(s, work, ok)
            finally:
                server.shutdown()
    except MedbatchError as exc:
        raise fail(exc) from exc
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


@app.command(rich_help_panel="PACS push")
def studies(
    limit: Annotated[int, typer.Option(help="Newest studies to list.")] = 20,
) -> None:
    """Received DICOM studies: instances, result versions and the newest result of each."""
    from medbatch.services.studies import list_studies

    table = Table("study", "from AE", "instances", "open", "versions", "p(lesion)", "last")
    for study in list_studies(settings(), actor=terminal_user(), limit=limit):
        newest = study.newest
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
