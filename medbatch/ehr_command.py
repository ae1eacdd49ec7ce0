"""``medbatch ehr FILE``: register an extract, follow its ingest and scoring, print what
happened to every row and patient (the drop folder does the same without a terminal)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy import func, select

from db.models import TERMINAL_STATES, EhrScore, Job, JobKind, JobState
from db.session import session_scope
from medbatch.errors import MedbatchError
from medbatch.settings import Settings


def _progress(console: Console, *columns: object) -> Progress:
    return Progress(
        *columns,  # type: ignore[arg-type]
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal and os.environ.get("CI") == "true",
    )


def _children(s: Settings, extract_id: int) -> tuple[Job | None, Job | None, dict[str, int]]:
    """The extract, its ingest job, and the states of its scoring batches."""
    with session_scope(s.database_url) as session:
        extract = session.get(Job, extract_id)
        ingest = session.scalars(
            select(Job).where(Job.parent_id == extract_id, Job.kind == JobKind.EHR_INGEST.value)
        ).first()
        states = dict(
            session.execute(
                select(Job.state, func.count())
                .where(Job.parent_id == extract_id, Job.kind == JobKind.EHR_BATCH.value)
                .group_by(Job.state)
            ).all()
        )
        for job in (extract, ingest):
            if job is not None:
                session.expunge(job)
    return extract, ingest, {str(k): int(v) for k, v in states.items()}


def follow(s: Settings, extract_id: int, console: Console, timeout: float) -> None:
    """Progress bars for the ingest (bytes) and the scoring (batches) until the extract ends."""
    deadline = time.monotonic() + timeout
    with _progress(
        console,
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[note]}"),
    ) as bars:
        reading = bars.add_task("reading", total=None, note="")
        scoring = None
        while True:
            extract, ingest, states = _children(s, extract_id)
            if extract is None:
                raise MedbatchError(f"job {extract_id} vanished")
            if ingest is not None:
                summ = dict(ingest.summary or {})
                bars.update(
                    reading,
                    total=max(int(ingest.params.get("size_bytes", 0)), 1),
                    completed=summ.get("bytes_read", 0)
                    if ingest.state != JobState.DONE.value
                    else ingest.params.get("size_bytes", 1),
                    note=f"{summ.get('bytes_read', 0) / 1e6:,.0f} MB · "
                    f"{summ.get('accepted_rows', 0):,} rows, "
                    f"{summ.get('rejected_rows', 0):,} rejected",
                )
            if states:
                total = sum(states.values())
                done = sum(n for st, n in states.items() if JobState(st) in TERMINAL_STATES)
                if scoring is None:
                    scoring = bars.add_task("scoring", total=total, note="batches")
                bars.update(scoring, total=total, completed=done, note=f"{done}/{total} batches")
            if JobState(extract.state) in TERMINAL_STATES:
                return
            if time.monotonic() > deadline:
                raise MedbatchError(
                    f"job {extract_id} not finished after {timeout:.0f} s; "
                    f"`medbatch jobs {extract_id}` shows it"
                )
            time.sleep(0.5)


def summary_table(s: Settings, extract_id: int) -> Table:
    with session_scope(s.database_url) as session:
        job = session.get_one(Job, extract_id)
        patients = session.scalar(
            select(func.count(func.distinct(EhrScore.patient_id))).where(
                EhrScore.extract_id == extract_id
            )
        )
        ood = session.scalar(
            select(func.count())
            .select_from(EhrScore)
            .where(EhrScore.extract_id == extract_id, EhrScore.out_of_distribution.is_(True))
        )
        c = dict(job.summary or {})
        table = Table(
            title=f"EHR extract job {job.id}: {job.source} — {job.state}", show_header=False
        )
        table.add_row("measurements accepted", f"{c.get('accepted_rows', 0):,}")
        table.add_row("rows rejected", f"{c.get('rejected_rows', 0):,}")
        for kind, n in sorted(c.get("rejected_by_kind", {}).items()):
            table.add_row(f"  {kind.replace('_', ' ')}", f"{n:,}")
        for reason, n in c.get("skipped", {}).items():  # FHIR: not results, not errors
            table.add_row(f"skipped: {reason}", f"{n:,}")
        if unknown := c.get("unknown_codes", {}):
            shown = ", ".join(f"{code} ×{n:,}" for code, n in list(unknown.items())[:5])
            table.add_row("observations of codes no model uses", shown)
        table.add_row("patients scored", f"{patients:,}")
        table.add_row("out-of-distribution profiles", f"{ood:,}")
        table.add_row("scoring batches", str(c.get("buckets", 0)))
        if job.error:
            table.add_row("error", job.error)
    return table


def submit_and_follow(
    s: Settings, path: Path, console: Console, *, force: bool, wait: bool, timeout: float
) -> int:
    from db.migrate import upgrade
    from ingest.ehr.submit import submit_extract
    from medbatch.stack.redis_server import ping
    from workers.dispatch import publish

    upgrade(s.database_url)
    if not ping(s.broker_url):
        raise MedbatchError(
            f"Redis at {s.broker_url} does not answer; start the stack with `medbatch up`"
        )
    console.print(f"hashing {path.name} …")
    result = submit_extract(path, s, publish, force=force)
    if result.existing:
        console.print(
            f"[yellow]this extract's content was already submitted as job {result.job_id}; "
            "not rescored[/] (use --force)"
        )
    elif wait:
        follow(s, result.job_id, console, timeout)
    return result.job_id


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged."""
    import numpy as np

    y = np.asarray(labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if not n_pos or not n_neg:
        return None
    _, where, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where]  # 1-based, ties share their mean
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def truth_check(s: Settings, extract_id: int, truth_csv: Path) -> dict[str, float | None]:
    """AUROC of the stored risks against the generator's ground-truth labels (demo only: a real
    extract has no truth file)."""
    import csv

    with truth_csv.open() as fh:
        truth = {r["patient_id"]: r for r in csv.DictReader(fh)}
    label_of = {
        "diabetes_lstm_attention": "diabetes_complication_label",
        "cvd_autoencoder": "cvd_label",
    }
    found: dict[str, tuple[list[float], list[int]]] = {m: ([], []) for m in label_of}
    with session_scope(s.database_url) as session:
        for model, patient_id, risk in session.execute(
            select(EhrScore.model_name, EhrScore.patient_id, EhrScore.risk).where(
                EhrScore.extract_id == extract_id
            )
        ):
            if model in found and patient_id in truth and risk is not None:
                found[model][0].append(float(risk))
                found[model][1].append(int(truth[patient_id][label_of[model]]))
    return {m: auroc(*found[m]) for m in found}
