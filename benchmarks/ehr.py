"""Workload 3, nightly EHR: a generated 1-million-row extract end to end to stored scores, beside
pyarrow's raw parse of the same file (the limit: reading the CSV as strings and nothing else).

    python -m benchmarks.ehr                  # 1 worker process, then 2 (scale-out)
    python -m benchmarks.ehr --workers 1      # one configuration only
    python -m benchmarks.ehr --quick          # a smoke run (200k rows, 1 rep)
    python -m benchmarks.ehr --storage local,s3   # storage in a directory and in S3 (SeaweedFS)

medbatch's side is the real path: ``submit_extract`` → Redis → a Celery worker streams and
validates the file, spills patients into buckets → one scoring job per bucket → Triton (both
EHR models) → scores and explanations in SQLite. Its time runs from submission to the extract
job's ``done``; each repetition resubmits with ``force`` so nothing is skipped as already scored.
Per stage: the ingest's own time, the time scoring jobs waited for a worker, and their run time.
Worker memory: the peak resident set of each task (VmHWM reset when the task starts).
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
DEFAULT_EXTRACT = REPO / ".bench" / "ehr-1m.csv"
PATIENTS_FOR_1M = 23_500  # ~44 rows per patient in the generator's long format


def make_extract(path: Path, patients: int) -> int:
    """The generated extract (deterministic; kept across runs); returns its data rows."""
    from medbatch.synth.ehr import write_long_csv

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_long_csv(path, patients, seed=2026, messiness=0.002)
    with path.open("rb") as fh:
        return sum(1 for _ in fh) - 1


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extract", type=Path, default=DEFAULT_EXTRACT)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="worker processes to compare")
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument(
        "--profile", action="store_true", help="one more run per configuration under py-spy"
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument(
        "--storage",
        default="local",
        help="comma-separated: local (a directory) and/or s3 (SeaweedFS on loopback); with s3 "
        "the extract, its buckets and their reads go through the object store",
    )
    args = parser.parse_args()
    storages = [x.strip() for x in args.storage.split(",") if x.strip()]
    if not storages or not set(storages) <= {"local", "s3"}:
        raise SystemExit("--storage: local and/or s3")

    from rich.console import Console
    from rich.table import Table

    from core.settings import Settings
    from db.migrate import upgrade
    from medbatch.stack.embedded import EmbeddedStack
    from medbatch.stack.process import free_port
    from medbatch.stack.worker_process import use_settings

    console = Console()
    extract = args.extract
    if args.quick:
        extract = extract.with_name("ehr-200k.csv")
    rows = make_extract(extract, PATIENTS_FOR_1M // 5 if args.quick else PATIENTS_FOR_1M)
    reps = 1 if args.quick else args.reps
    console.print(f"{extract.name}: {rows:,} rows, {extract.stat().st_size / 1e6:.0f} MB")

    s3 = None
    if "s3" in storages:
        import atexit

        from medbatch.stack.s3_server import S3Server

        s3 = S3Server(Path(tempfile.mkdtemp(prefix="medbatch-bench-s3-"))).start()
        atexit.register(s3.stop)
        os.environ.update(s3.env())
    results: dict[str, Any] = {}
    configs = [(int(w), st) for w in args.workers.split(",") for st in storages]
    for n_workers, storage in configs:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                storage_dir=Path(tmp),
                storage_url=s3.url(f"bench-{tmp.rsplit('/', 1)[-1]}")
                if storage == "s3" and s3
                else "",
                s3_endpoint_url=s3.endpoint_url if storage == "s3" and s3 else "",
                database_url=f"sqlite:///{tmp}/medbatch.db",
                broker_url=f"redis://127.0.0.1:{free_port()}/0",
                triton_http_port=free_port(),
                triton_grpc_port=free_port(),
                triton_metrics_port=free_port(),
                worker_concurrency=1,
            )
            use_settings(settings)
            upgrade(settings.database_url)
            stack = EmbeddedStack(settings, workers=n_workers, beat=False, report=console.log)
            with stack:
                medbatch_run(settings, extract)  # warm: models loaded, imports done
                runs: list[dict[str, Any]] = []
                parses: list[float] = []
                for _ in range(reps):  # alternating: the limit, then medbatch
                    parses.append(pyarrow_parse(extract, settings.ehr_block_bytes))
                    runs.append(medbatch_run(settings, extract))
                profile = _profiled_run(stack, settings, extract) if args.profile else {}
        med = {k: median([r[k] for r in runs]) for k in runs[0]}
        results[f"{n_workers}" + ("-s3" if storage == "s3" else "")] = {
            "runs": runs,
            "profile_top_frames": profile,
            "median": med,
            "medbatch_rows_per_s": rows / med["seconds"],
            "pyarrow_parse_rows_per_s": rows / median(parses),
            "parse_seconds": parses,
            "load_average": os.getloadavg(),
        }

    table = Table(title=f"EHR extract end to end ({rows:,} rows), medians of {reps}")
    for col in (
        "workers",
        "medbatch rows/s",
        "pyarrow parse rows/s",
        "medbatch / parse",
        "ingest rows/s",
        "scoring wall s",
        "peak RSS MB",
    ):
        table.add_column(col, justify="right")
    for n, r in results.items():
        m = r["median"]
        table.add_row(
            n,
            f"{r['medbatch_rows_per_s']:,.0f}",
            f"{r['pyarrow_parse_rows_per_s']:,.0f}",
            f"{r['medbatch_rows_per_s'] / r['pyarrow_parse_rows_per_s']:.2f}×",
            f"{m['ingest_rows_per_s']:,.0f}",
            f"{m['scoring_wall_seconds']:.1f}",
            f"{max(m['ingest_peak_rss_mb'], m['batch_peak_rss_mb']):.0f}",
        )
    console.print(table)
    if len(results) > 1:
        ones, twos = results.get("1"), results.get("2")
        if ones and twos:
            console.print(
                f"scale-out: 2 workers / 1 worker = "
                f"{twos['medbatch_rows_per_s'] / ones['medbatch_rows_per_s']:.2f}×"
            )
    for n in {w.split("-")[0] for w in results}:
        local, on_s3 = results.get(n), results.get(f"{n}-s3")
        if local and on_s3:
            ingest = on_s3["median"]["ingest_rows_per_s"] / local["median"]["ingest_rows_per_s"]
            console.print(
                f"storage, {n} worker(s): S3 / local directory = "
                f"{on_s3['medbatch_rows_per_s'] / local['medbatch_rows_per_s']:.2f}× end to end, "
                f"{ingest:.2f}× ingest (the spill's buckets stored in S3)"
            )
    for n_workers, result in results.items():
        for name, summary in result["profile_top_frames"].items():
            frames = "; ".join(
                f"{r['frame']} {r['share']:.0%}" for r in summary.get("self", [])[:6]
            )
            console.print(f"[bold]{n_workers} worker(s), {name}[/bold] py-spy self: {frames}")
    path = write_record(
        "ehr",
        {
            "extract": extract.name,
            "rows": rows,
            "size_bytes": extract.stat().st_size,
            "reps": reps,
            "by_workers": results,
            "targets": {"rows_per_s": ">= 500000", "worker_peak_rss_mb": "<= 1024"},
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


if __name__ == "__main__":
    main()
