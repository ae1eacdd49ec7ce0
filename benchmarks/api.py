"""The HTTP API against the CLI, on this machine, in the same run:

(a) **Submission**: the 20,000-molecule screening library (``benchmarks/screening.py``'s) as
    ``POST /api/v1/libraries`` and polling ``GET /api/v1/jobs/{id}``, against ``medbatch screen``
    on the same file, time to ``done`` (goal: the API ≤ 1.1× the CLI's time). Redis and Triton
    start once; each repetition gets a fresh SQLite database, fresh workers and (API side) a
    fresh ``medbatch serve`` on it, all started before the clock. Both clients poll every 0.1 s.
(b) **Export**: 1 M EHR result rows (one per patient) through ``GET /api/v1/jobs/{id}/results``
    as CSV and Parquet, against ``medbatch results --out`` on the same extract; the server's peak
    memory during each download (its ``VmHWM``, reset before each) and the CLI process's. The
    rows are real: a small synthetic extract is scored by the stack, then its ``ehr_scores`` rows
    are copied under new patient identifiers by one ``INSERT … SELECT`` up to 1 M patients.

    python -m benchmarks.api            # --quick: 2,000 molecules and 50,000 rows, one rep

Sides alternate each repetition; the table shows medians, the JSON record goes to
``benchmarks/results/api-*.json`` with the load average before and after.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import alternate, median, write_record

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench" / "api"
POLL_S = 0.1  # what `medbatch screen` polls at (services.jobs.POLL_S, wait_for_job)


def _library(n: int) -> Path:
    from benchmarks.screening import BENCH_DIR as SCREENING_DIR
    from benchmarks.screening import build_library

    path = SCREENING_DIR / f"library-{n}.csv"
    if not path.is_file():
        build_library(path, n)
    return path


def _status_kb(pid: int, field: str = "VmHWM") -> int:
    """A memory figure of a live process from /proc (kB): VmHWM, its peak resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak resident set (Linux)


class Stack:
    """Redis and Triton once; per repetition a fresh database, workers and API server."""

    def __init__(self, root: Path, concurrency: int, chunk_size: int) -> None:
        from core.settings import Settings
        from medbatch.stack.embedded import EmbeddedStack
        from medbatch.stack.process import free_port

        self.root = root
        self.concurrency = concurrency
        self.base = Settings(
            storage_dir=root,
            database_url=f"sqlite:///{root / 'warmup.db'}",
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            triton_http_port=free_port(),
            triton_grpc_port=free_port(),
            triton_metrics_port=free_port(),
            triton_timeout_s=120.0,
            chem_chunk_size=chunk_size,
            worker_concurrency=concurrency,
            metrics_port=0,
            api_max_upload_bytes=1 << 30,
        )
        self.stack = EmbeddedStack(self.base, workers=0, beat=False, ready_timeout_s=240)
        self.n = 0

    def __enter__(self) -> Stack:
        from workers.celery_app import app, reconfigure

        self.stack.__enter__()
        reconfigure(app, self.base)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(None, None, None)

    def fresh(self, name: str) -> Any:
        """Settings on a new, migrated database with its own API port."""
        from db.migrate import upgrade
        from medbatch.stack.process import free_port

        self.n += 1
        settings = self.base.model_copy(
            update={
                "database_url": f"sqlite:///{self.root / f'{name}{self.n}.db'}",
                "api_port": free_port(),
            }
        )
        upgrade(settings.database_url)
        return settings

    def workers(self, settings: Any, n: int = 1) -> list[Any]:
        from medbatch.stack.worker_process import worker_process, worker_ready

        procs = [
            worker_process(settings, self.root, concurrency=self.concurrency).start()
            for _ in range(n)
        ]
        for proc in procs:
            proc.wait_until(partial(worker_ready, proc), 120, "ready")
        return procs

    def server(self, settings: Any) -> Any:
        from medbatch.stack.process import ManagedProcess, port_open
        from medbatch.stack.worker_process import settings_env

        argv = [sys.executable, "-m", "medbatch.cli", "serve"]
        log = self.root / f"api-{settings.api_port}.log"
        proc = ManagedProcess("api", argv, settings_env(settings), log).start()
        proc.wait_until(lambda: port_open("127.0.0.1", settings.api_port), 60, "serving")
        return proc


def _token(settings: Any, scope: str = "admin") -> str:
    from medbatch.services.tokens import Scope, create_token

    return create_token(
        settings, f"bench-{time.monotonic_ns()}", frozenset({Scope(scope)}), actor="bench"
    )[1]


def _check_done(settings: Any, job_id: int, molecules: int) -> None:
    from medbatch.services.screening import screening_summary

    summary = screening_summary(settings, job_id)
    if summary.state != "done" or summary.scored_now != molecules:
        raise RuntimeError(f"job {job_id}: {summary}")


# --- (a) submission ---------------------------------------------------------------------------
def cli_screen(stack: Stack, library: Path, molecules: int) -> float:
    from medbatch.services.jobs import list_jobs
    from medbatch.stack.worker_process import settings_env

    settings = stack.fresh("cli")
    procs = stack.workers(settings)
    argv = [sys.executable, "-m", "medbatch.cli", "screen", str(library)]
    argv += ["--smiles-column", "smiles", "--id-column", "id"]
    try:
        t0 = time.perf_counter()
        subprocess.run(
            argv, env=settings_env(settings), check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=1800,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.stop()
    (job,) = list_jobs(settings, actor="bench", limit=1)
    _check_done(settings, job.id, molecules)
    return seconds


def api_screen(stack: Stack, library: Path, molecules: int, record: list[dict[str, Any]]) -> float:
    settings = stack.fresh("api")
    procs = stack.workers(settings)
    server = stack.server(settings)
    token = _token(settings, "submit")
    try:
        with (
            httpx.Client(
                base_url=f"http://127.0.0.1:{settings.api_port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=600,
            ) as client,
            library.open("rb") as fh,
        ):
            t0 = time.perf_counter()
            answer = client.post(
                "/api/v1/libraries",
                files={"file": (library.name, fh, "text/csv")},
                data={"smiles_column": "smiles", "id_column": "id"},
            )
            answered = time.perf_counter() - t0
            answer.raise_for_status()
            job_id = answer.json()["id"]
            while True:
                state = client.get(f"/api/v1/jobs/{job_id}").json()["state"]
                if state in ("done", "failed", "rejected"):
                    break
                time.sleep(POLL_S)
            seconds = time.perf_counter() - t0
    finally:
        server.stop()
        for proc in procs:
            proc.stop()
    _check_done(settings, job_id, molecules)
    record.append({"answered_after_s": round(answered, 3), "seconds": round(seconds, 3)})
    return seconds


# --- (b) export -------------------------------------------------------------------------------
def seed_extract(stack: Stack, rows: int, patients: int) -> tuple[Any, int]:
    """A scored extract of ``rows`` patients: ``patients`` scored for real, then their score
    rows copied under new identifiers (one INSERT … SELECT, no model run)."""
    from sqlalchemy import func, select, text

    from db.models import EhrScore
    from db.session import session_scope
    from medbatch.services.ehr import submit_extract
    from medbatch.services.jobs import wait_for_job
    from medbatch.synth.ehr import write_long_csv

    settings = stack.fresh("export")
    extract = stack.root / "seed-extract.csv"
    write_long_csv(extract, patients, seed=7, messiness=0.0)
    procs = stack.workers(settings)
    try:
        job_id = submit_extract(settings, extract, actor="bench").job_id
        if wait_for_job(settings, job_id, 900).state != "done":
            raise RuntimeError(f"seed extract {job_id} did not finish")
    finally:
        for proc in procs:
            proc.stop()
    with session_scope(settings.database_url) as session:
        scored = session.scalar(
            select(func.count(func.distinct(EhrScore.patient_id))).where(
                EhrScore.extract_id == job_id
            )
        )
        copies = -(-rows // int(scored or 1)) - 1
        columns = (
            "extract_id, job_id, model_name, model_version, risk, not_scored, "
            "out_of_distribution, reconstruction_error, visits, measurements, explanation, "
            "created_at"
        )
        copied = columns.replace("extract_id", "s.extract_id")
        session.execute(
            text(
                "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < :copies) "
                f"INSERT INTO ehr_scores (patient_id, {columns}) "
                f"SELECT printf('%s-c%05d', s.patient_id, k.n), {copied} "
                "FROM ehr_scores s, k WHERE s.extract_id = :job"
            ),
            {"copies": copies, "job": job_id},
        )
        total = session.scalar(
            select(func.count(func.distinct(EhrScore.patient_id))).where(
                EhrScore.extract_id == job_id
            )
        )
    return settings, int(total or 0)


def api_export(
    url: str, token: str, job_id: int, fmt: str, server_pid: int, out: Path, expect: int,
    peaks: dict[str, list[int]],
) -> float:  # fmt: skip
    _reset_hwm(server_pid)
    peaks[f"api_{fmt}_before"].append(_status_kb(server_pid, "VmRSS"))
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=3600
    ) as c:
        t0 = time.perf_counter()
        with c.stream("GET", f"/api/v1/jobs/{job_id}/results", params={"format": fmt}) as r:
            r.raise_for_status()
            with out.open("wb") as fh:
                for chunk in r.iter_bytes(1 << 20):
                    fh.write(chunk)
        seconds = time.perf_counter() - t0
    peaks[f"api_{fmt}"].append(_status_kb(server_pid))
    _check_rows(out, fmt, expect)
    return seconds


def cli_export(
    settings: Any, job_id: int, fmt: str, out: Path, expect: int, peaks: dict[str, list[int]]
) -> float:
    from medbatch.stack.worker_process import settings_env

    argv = [sys.executable, "-m", "medbatch.cli", "results", str(job_id), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=settings_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"medbatch results exited {proc.returncode}")
    peaks[f"cli_{fmt}"].append(int(usage.ru_maxrss))
    _check_rows(out, fmt, expect)
    return seconds


def _check_rows(path: Path, fmt: str, expect: int) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        got = pq.ParquetFile(path).metadata.num_rows
    else:
        with path.open(newline="") as fh:
            got = sum(1 for _ in csv.reader(fh)) - 1  # the header
    if got != expect:
        raise RuntimeError(f"{path.name}: {got} rows, {expect} expected")


# --- the run ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--molecules", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="EHR export rows")
    parser.add_argument("--reps", type=int, default=3, help="submission repetitions")
    parser.add_argument(
        "--export-reps",
        type=int,
        default=1,
        help="export repetitions (each side and format; 1 M rows take minutes a side here)",
    )
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool size")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--skip-submit", action="store_true")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2,000 molecules, 50,000 rows, 1 rep")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    n, rows, reps = (2000, 50_000, 1) if args.quick else (args.molecules, args.rows, args.reps)
    export_reps = 1 if args.quick else args.export_reps

    from rich.console import Console
    from rich.table import Table

    console = Console()
    record: dict[str, Any] = {
        "quick": args.quick,
        "reps": reps,
        "export_reps": export_reps,
        "poll_s": POLL_S,
    }
    load = [os.getloadavg()]
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medbatch-api-bench-") as tmp:
        root = Path(tmp)
        with Stack(root, args.concurrency, args.chunk_size) as stack:
            if not args.skip_submit:
                library = _library(n)
                warm = root / "warmup.csv"  # Triton's first requests, the workers' imports
                warm.write_text("\n".join(library.read_text().splitlines()[:1025]) + "\n")
                api_screen(stack, warm, 1024, [])
                submits: list[dict[str, Any]] = []
                times = alternate(
                    {
                        "cli": lambda: cli_screen(stack, library, n),
                        "api": lambda: api_screen(stack, library, n, submits),
                    },
                    reps,
                )
                ratio = median(times["api"]) / median(times["cli"])
                record["submit"] = {
                    "molecules": n,
                    "library": library.name,
                    "seconds": times,
                    "api_over_cli": ratio,
                    "target": 1.1,
                    "api_runs": submits,
                }
                load.append(os.getloadavg())
                table = Table(title=f"{n:,} molecules to done: API vs `medbatch screen`")
                for col in ("side", "median s", "mol/s", "reps (s)"):
                    table.add_column(col, justify="right")
                for k, v in times.items():
                    table.add_row(
                        k,
                        f"{median(v):.2f}",
                        f"{n / median(v):,.0f}",
                        " ".join(f"{x:.1f}" for x in v),
                    )
                console.print(table)
                console.print(f"API / CLI time to done: [bold]{ratio:.3f}×[/bold] (goal ≤ 1.1×)")

            if not args.skip_export:
                t0 = time.perf_counter()
                settings, total = seed_extract(stack, rows, 200 if args.quick else 1000)
                seeded_s = time.perf_counter() - t0
                from medbatch.services.jobs import list_jobs

                (job,) = list_jobs(settings, actor="bench", kind="ehr_extract", limit=1)
                server = stack.server(settings)
                token = _token(settings, "read")
                url = f"http://127.0.0.1:{settings.api_port}"
                peaks: dict[str, list[int]] = {
                    f"{s}_{f}{b}": []
                    for s in ("api", "cli")
                    for f in ("csv", "parquet")
                    for b in ("", "_before")
                }
                try:
                    times = alternate(
                        {
                            f"{side}_{fmt}": (
                                partial(
                                    api_export,
                                    url,
                                    token,
                                    job.id,
                                    fmt,
                                    server.pid,
                                    root / f"api.{fmt}",
                                    total,
                                    peaks,
                                )
                                if side == "api"
                                else partial(
                                    cli_export,
                                    settings,
                                    job.id,
                                    fmt,
                                    root / f"cli.{fmt}",
                                    total,
                                    peaks,
                                )
                            )
                            for fmt in ("csv", "parquet")
                            for side in ("api", "cli")
                        },
                        export_reps,
                    )
                finally:
                    server.stop()
                sizes = {f: (root / f"api.{f}").stat().st_size for f in ("csv", "parquet")}
                record["export"] = {
                    "rows": total,
                    "seeded_s": round(seeded_s, 1),
                    "seconds": times,
                    "rows_per_s": {k: total / median(v) for k, v in times.items()},
                    "api_over_cli": {
                        f: median(times[f"api_{f}"]) / median(times[f"cli_{f}"])
                        for f in ("csv", "parquet")
                    },
                    "peak_rss_mb": {k: [round(x / 1024, 1) for x in v] for k, v in peaks.items()},
                    "bytes": sizes,
                }
                load.append(os.getloadavg())
                table = Table(
                    title=f"Export of {total:,} EHR result rows: API vs `medbatch results`"
                )
                for col in ("side", "median s", "rows/s", "peak RSS MB (median)", "reps (s)"):
                    table.add_column(col, justify="right")
                for k, v in times.items():
                    table.add_row(
                        k,
                        f"{median(v):.2f}",
                        f"{total / median(v):,.0f}",
                        f"{median([x / 1024 for x in peaks[k]]):.0f}",
                        " ".join(f"{x:.1f}" for x in v),
                    )
                console.print(table)
                for f in ("csv", "parquet"):
                    console.print(
                        f"{f}: API / CLI time {record['export']['api_over_cli'][f]:.3f}×, "
                        f"{sizes[f] / 1e6:,.0f} MB"
                    )
    record["loadavg_before_after"] = load
    path = write_record("api", record, args.out_dir)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    console.print(f"load average {load}; record: {shown}")


if __name__ == "__main__":
    main()
