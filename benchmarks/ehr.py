"""Workload 3, nightly EHR: a 1-million-row long extract end to end to stored scores, beside
pyarrow's raw parse of the same file (the limit: reading the CSV as strings and nothing else),
on SQLite and on PostgreSQL (production), at several patient densities.

    python -m benchmarks.ehr                          # 90, 30 and 300 rows/patient, both databases
    python -m benchmarks.ehr --densities 90 --databases sqlite
    python -m benchmarks.ehr --workers 1,2            # the scale-out comparison
    python -m benchmarks.ehr --quick                  # a smoke run (200k rows, 1 rep, SQLite)
    python -m benchmarks.ehr --extract FILE           # one given extract instead
    python -m benchmarks.ehr --storage local,s3       # storage in a directory and in S3 (SeaweedFS)

The extracts come from :mod:`benchmarks.ehr_extract`, a generator independent of medbatch's own:
~N rows per patient, UTC offsets and ``Z``, mixed ISO 8601 forms, units as sites report them.

medbatch's side is the real path: ``submit_extract`` → Redis → a Celery worker streams and
validates the file, spills patients into buckets → one scoring job per bucket → Triton (both
EHR models) → scores and explanations in the database. Its time runs from submission to the
extract job's ``done``; each repetition resubmits with ``force`` so nothing is skipped as already
scored. Then once ``medbatch ehr FILE --force`` as a new process: from the command to done
(interpreter start-up, hashing, polling included). Rows/s and patients/s; per stage: the ingest's
own time, the time scoring jobs waited for a worker, and their run time. Worker memory: the peak
resident set of each task (VmHWM reset when the task starts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_PROFILE_DIR,
    median,
    start_spies,
    summarise_profile,
    write_record,
)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"


def make_extract(rows: int, rows_per_patient: int) -> tuple[Path, int]:
    """The generated extract (deterministic; kept across runs) and its data rows."""
    from benchmarks.ehr_extract import write_extract

    path = BENCH_DIR / f"ehr-{rows // 1000}k-{rows_per_patient}pp.csv"
    if not path.is_file():
        tmp = path.with_suffix(".partial")
        write_extract(tmp, rows, rows_per_patient)
        tmp.rename(path)
    return path, count_rows(path)


def count_rows(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for _ in fh) - 1


def command_run(settings: Any, path: Path) -> float:
    """Seconds of ``medbatch ehr FILE --force`` in a new process, from the command to done."""
    import subprocess
    import sys

    from core.settings import settings_env

    exe = Path(sys.executable).with_name("medbatch")
    t0 = time.perf_counter()
    subprocess.run(
        [str(exe), "ehr", str(path), "--force"],
        env=settings_env(settings),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def pyarrow_parse(path: Path, block_size: int) -> float:
    """Seconds to stream the whole file through pyarrow's CSV reader as strings (the limit)."""
    import pyarrow as pa
    from pyarrow import csv as pacsv

    from ingest.ehr.schema import LONG_COLUMNS

    t0 = time.perf_counter()
    with path.open("rb") as fh:
        reader = pacsv.open_csv(
            fh,
            read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in LONG_COLUMNS}
            ),
        )
        for _ in reader:
            pass
    return time.perf_counter() - t0


def medbatch_run(settings: Any, path: Path) -> dict[str, Any]:
    """One end-to-end run; its seconds, stages and the workers' memory."""
    from sqlalchemy import select

    from core.job_kinds import JobKind
    from db.models import TERMINAL_STATES, Job, JobState
    from db.session import session_scope
    from ingest.ehr.submit import submit_extract
    from workers.dispatch import publish

    t0 = time.perf_counter()
    sub = submit_extract(path, settings, publish, force=True)
    while True:
        with session_scope(settings.database_url) as session:
            state = session.get_one(Job, sub.job_id).state
        if JobState(state) in TERMINAL_STATES:
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if state != JobState.DONE.value:
        raise RuntimeError(f"extract job {sub.job_id} ended {state}")
    with session_scope(settings.database_url) as session:
        children = list(session.scalars(select(Job).where(Job.parent_id == sub.job_id)))
        ingest = next(c for c in children if c.kind == JobKind.EHR_INGEST.value)
        batches = [c for c in children if c.kind == JobKind.EHR_BATCH.value]
        ingest_end = ingest.finished_at
        waits = [(b.started_at - ingest_end).total_seconds() for b in batches]
        runs = [(b.finished_at - b.started_at).total_seconds() for b in batches]
        last = max(b.finished_at for b in batches)
        return {
            "seconds": seconds,
            "rows": ingest.summary["accepted_rows"] + ingest.summary["rejected_rows"],
            "patients": sum(b.summary["patients"] for b in batches),
            "batches": len(batches),
            "ingest_seconds": ingest.summary["seconds"],
            "ingest_rows_per_s": ingest.summary["rows_per_s"],
            "scoring_wall_seconds": (last - ingest_end).total_seconds(),
            "batch_run_seconds_sum": sum(runs),
            "batch_wait_seconds_max": max(waits),
            **{
                f"batch_{stage}_seconds_sum": sum(
                    b.summary["stage_seconds"][stage] for b in batches
                )
                for stage in ("features", "triton_wait", "store")
            },
            "ingest_peak_rss_mb": ingest.summary["peak_rss_mb"],
            "batch_peak_rss_mb": max(b.summary["peak_rss_mb"] for b in batches),
        }


EHR_FRAMES = ("ingest/ehr", "workers/ehr", "workers/lifecycle", "db/", "tritonclient/", "model.py")


def _profiled_run(stack: Any, settings: Any, extract: Path) -> dict[str, Any]:
    """One more run with py-spy on every worker process (and its pool children) and on Triton's
    python backend stubs; the hottest frames of each."""
    out = BENCH_PROFILE_DIR / "ehr"
    shutil.rmtree(out, ignore_errors=True)
    targets = [(f"worker{i}", p.pid, True) for i, p in enumerate(stack.workers)]
    if getattr(stack, "triton", None) is not None:
        targets.append(("triton", stack.triton.pid, True))
    spies = start_spies(targets, out)
    try:
        medbatch_run(settings, extract)
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(timeout=60)
    return {p.stem: summarise_profile(p, EHR_FRAMES) for p in sorted(out.glob("*.txt"))}


def _run_database(
    database: str,
    n_workers: int,
    extracts: list[tuple[int, Path, int]],
    reps: int,
    args: Any,
    s3: Any = None,
    *,
    slots: int = 0,
    release: bool = True,
) -> dict[str, Any]:
    """Every extract through one stack on ``database``: warm run, then alternating parse and
    medbatch, then the command once; keyed by rows per patient. ``s3``: a running S3 server
    that holds what medbatch keeps (else a local directory)."""
    from contextlib import ExitStack

    from rich.console import Console

    from benchmarks.common import fresh_postgres_database
    from core.settings import Settings
    from db.migrate import upgrade
    from medbatch.stack.embedded import EmbeddedStack
    from medbatch.stack.process import free_port
    from medbatch.stack.worker_process import use_settings

    console = Console()
    out: dict[str, Any] = {}
    with ExitStack() as stack_ctx:
        tmp = stack_ctx.enter_context(tempfile.TemporaryDirectory())
        url = (
            f"sqlite:///{tmp}/medbatch.db"
            if database == "sqlite"
            else stack_ctx.enter_context(fresh_postgres_database())
        )
        settings = Settings(
            storage_dir=Path(tmp),
            storage_url=s3.url(f"bench-{Path(tmp).name}") if s3 else "",
            s3_endpoint_url=s3.endpoint_url if s3 else "",
            database_url=url,
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            triton_http_port=free_port(),
            triton_grpc_port=free_port(),
            triton_metrics_port=free_port(),
            ehr_release_grouped=release,
            **({"worker_concurrency": slots} if slots else {}),
        )
        use_settings(settings)
        upgrade(settings.database_url)
        stack = stack_ctx.enter_context(
            EmbeddedStack(settings, workers=n_workers, beat=False, report=console.log)
        )
        for density, extract, rows in extracts:
            medbatch_run(settings, extract)  # warm: models loaded, imports done, file cached
            runs: list[dict[str, Any]] = []
            parses: list[float] = []
            for _ in range(reps):  # alternating: the limit, then medbatch
                parses.append(pyarrow_parse(extract, settings.ehr_block_bytes))
                runs.append(medbatch_run(settings, extract))
            command = [] if args.no_command else [command_run(settings, extract)]
            profile = _profiled_run(stack, settings, extract) if args.profile else {}
            med = {k: median([r[k] for r in runs]) for k in runs[0]}
            out[str(density)] = {
                "extract": extract.name,
                "rows": rows,
                "runs": runs,
                "profile_top_frames": profile,
                "median": med,
                "medbatch_rows_per_s": rows / med["seconds"],
                "medbatch_patients_per_s": med["patients"] / med["seconds"],
                "command_seconds": command,
                "command_rows_per_s": rows / median(command) if command else None,
                "pyarrow_parse_rows_per_s": rows / median(parses),
                "parse_seconds": parses,
                "load_average": os.getloadavg(),
            }
            console.log(
                f"{database}, {n_workers} worker(s), {'S3' if s3 else 'local'} storage, "
                f"{density} rows/patient: "
                f"{out[str(density)]['medbatch_rows_per_s']:,.0f} rows/s"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extract", type=Path, default=None, help="one given extract instead")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--densities", default="90,30,300", help="rows per patient")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", default="1", help="worker processes to compare")
    parser.add_argument(
        "--slots", default="0", help="task slots per worker process to compare (0: the cores)"
    )
    parser.add_argument(
        "--release",
        default="on",
        help="on and/or off: early buckets while a grouped extract is read (ingest/ehr/release.py)",
    )
    parser.add_argument(
        "--storage",
        default="local",
        help="comma-separated: local (a directory) and/or s3 (SeaweedFS on loopback)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--no-command", action="store_true", help="skip the `medbatch ehr` run")
    parser.add_argument(
        "--profile", action="store_true", help="one more run per configuration under py-spy"
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.quick:
        args.rows, args.densities, args.databases, args.reps = 200_000, "90", "sqlite", 1
    databases = args.databases.split(",")
    if not set(databases) <= {"sqlite", "postgresql"}:
        raise SystemExit("--databases: sqlite and/or postgresql")
    if args.extract is not None:
        extracts = [(0, args.extract, count_rows(args.extract))]
    else:
        extracts = [(d, *make_extract(args.rows, d)) for d in map(int, args.densities.split(","))]
    for _, path, rows in extracts:
        console.print(f"{path.name}: {rows:,} rows, {path.stat().st_size / 1e6:.0f} MB")

    storages = [x.strip() for x in args.storage.split(",") if x.strip()]
    if not storages or not set(storages) <= {"local", "s3"}:
        raise SystemExit("--storage: local and/or s3")
    s3 = None
    if "s3" in storages:
        import atexit

        from medbatch.stack.s3_server import S3Server

        s3 = S3Server(Path(tempfile.mkdtemp(prefix="medbatch-bench-s3-"))).start()
        atexit.register(s3.stop)
        os.environ.update(s3.env())  # the workers' AWS_* credentials
    results: dict[str, Any] = {}
    for database in databases:
        for n_workers in [int(w) for w in args.workers.split(",")]:
            for slots in [int(x) for x in args.slots.split(",")]:
                for release in [x.strip() == "on" for x in args.release.split(",")]:
                    for storage in storages:
                        for density, result in _run_database(
                            database,
                            n_workers,
                            extracts,
                            args.reps,
                            args,
                            s3 if storage == "s3" else None,
                            slots=slots,
                            release=release,
                        ).items():
                            workers = f"{n_workers}x{slots or os.cpu_count()}" + (
                                "" if release else "-norelease"
                            )
                            results[f"{database}/{workers}/{storage}/{density}"] = result

    table = Table(title=f"EHR extract end to end, medians of {args.reps}")
    for col in (
        "database",
        "workers",
        "storage",
        "rows/patient",
        "patients",
        "medbatch rows/s",
        "patients/s",
        "command rows/s",
        "pyarrow parse rows/s",
        "medbatch / parse",
        "ingest rows/s",
        "scoring wall s",
        "peak RSS MB",
    ):
        table.add_column(col, justify="right")
    for key, r in results.items():
        database, n, storage, density = key.split("/")
        m = r["median"]
        table.add_row(
            database,
            n,
            storage,
            f"{r['rows'] / m['patients']:.0f}",
            f"{m['patients']:,.0f}",
            f"{r['medbatch_rows_per_s']:,.0f}",
            f"{r['medbatch_patients_per_s']:,.0f}",
            f"{r['command_rows_per_s']:,.0f}" if r["command_rows_per_s"] else "-",
            f"{r['pyarrow_parse_rows_per_s']:,.0f}",
            f"{r['medbatch_rows_per_s'] / r['pyarrow_parse_rows_per_s']:.2f}×",
            f"{m['ingest_rows_per_s']:,.0f}",
            f"{m['scoring_wall_seconds']:.1f}",
            f"{max(m['ingest_peak_rss_mb'], m['batch_peak_rss_mb']):.0f}",
        )
    console.print(table)
    for key, on_s3 in results.items():
        local = results.get(key.replace("/s3/", "/local/"))
        if "/s3/" in key and local:
            ingest = on_s3["median"]["ingest_rows_per_s"] / local["median"]["ingest_rows_per_s"]
            console.print(
                f"storage, {key}: S3 / local directory = "
                f"{on_s3['medbatch_rows_per_s'] / local['medbatch_rows_per_s']:.2f}× end to end, "
                f"{ingest:.2f}× ingest (the spill's buckets stored in S3)"
            )
    for key, result in results.items():
        for name, summary in result["profile_top_frames"].items():
            frames = "; ".join(
                f"{r['frame']} {r['share']:.0%}" for r in summary.get("self", [])[:6]
            )
            console.print(f"[bold]{key}, {name}[/bold] py-spy self: {frames}")
    path = write_record(
        "ehr",
        {
            "extracts": {str(d): {"file": p.name, "rows": n} for d, p, n in extracts},
            "reps": args.reps,
            "by_database_workers_storage_density": results,
            "targets": {"rows_per_s": ">= 500000", "worker_peak_rss_mb": "<= 1024"},
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


if __name__ == "__main__":
    main()
