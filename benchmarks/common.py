"""Shared benchmark plumbing: alternating repetitions, medians, and the JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        info["gpu"] = gpu or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MEDBATCH_COMMIT", "unknown")


def alternate(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each side once per repetition, in turn, so drift hits every side alike."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_record(workload: str, record: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out_dir / f"{workload}-{stamp}.json"
    full = {"workload": workload, "time": stamp, "commit": commit(), "machine": machine(), **record}
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path


# --- profiling (py-spy) ----------------------------------------------------------------------
#: Where py-spy's raw stacks go (``--profile``), per workload.
BENCH_PROFILE_DIR = Path(__file__).resolve().parents[1] / ".bench" / "profile"


def _py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.is_file() else "py-spy"


def start_spies(
    targets: Sequence[tuple[str, int, bool]], out: Path
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each ``(name, pid, with_subprocesses)``, raw stacks into ``out/name.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid, children in targets:
        argv = [_py_spy(), "record", "--rate", "200", "--format", "raw", "--pid", str(pid)]
        argv += ["--subprocesses"] if children else []
        argv += ["-o", str(out / f"{name}.txt")]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the clock starts
    return spies


def summarise_profile(
    path: Path, project_frames: Sequence[str], top: int = 10
) -> dict[str, list[dict[str, Any]]]:
    """Hottest leaf frames (self time) and medbatch's own frames (inclusive), as sample shares."""
    if not path.is_file():
        return {}
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or not stack:
            continue
        samples += int(n)
        frames = stack.split(";")
        own[frames[-1]] += int(n)
        for frame in set(frames):
            if any(k in frame for k in project_frames):
                incl[frame] += int(n)

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "share": round(v / samples, 3)} for f, v in c.most_common(top)]

    return {"self": rows(own), "inclusive_medbatch": rows(incl), "samples": [{"n": samples}]}


# --- PostgreSQL ------------------------------------------------------------------------------
#: The server the PostgreSQL runs use (a fresh database each run, dropped afterwards).
BENCH_POSTGRES_URL = os.environ.get(
    "MEDBATCH_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def fresh_postgres_database(server_url: str = BENCH_POSTGRES_URL) -> Iterator[str]:
    """A new, empty database on ``server_url``'s server (as tests/conftest.py makes them);
    yields its URL and drops it afterwards. ``server_url``'s own database is never written."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(server_url).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    name = f"medbatch_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise SystemExit(
            f"PostgreSQL at {server_url} is not reachable ({str(exc).strip().splitlines()[0]}); "
            "set MEDBATCH_BENCH_POSTGRES_URL, or leave PostgreSQL out (--databases sqlite)"
        ) from exc
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from db.session import dispose_all

        dispose_all()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def process_group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of group ``pgid`` (Linux)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
