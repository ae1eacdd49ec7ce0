"""Shared benchmark plumbing: alternating repetitions, medians, and the JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
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
