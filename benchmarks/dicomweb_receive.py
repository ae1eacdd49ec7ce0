"""DICOMweb receive: the CT series pushed by STOW-RS into ``medbatch serve`` against the same
instances pushed by C-STORE into medbatch's listener and into DCMTK ``storescp`` (the peer in its
best configuration, ``TCP_NODELAY=1``), one and four concurrent clients, same run, alternating.

    python -m benchmarks.dicomweb_receive          # 300 instances, 3 alternating repetitions
    python -m benchmarks.dicomweb_receive --quick  # a smoke run (40 instances, 1 repetition)

Both medbatch front doors run in one stack (one storage directory, one database) and keep the
same guarantee: an instance is acknowledged only after its file and directory entry are fsync'd
and its row is committed. The STOW-RS client is ``curl`` (C, ``TCP_NODELAY`` by default, the
multipart bodies built before the clock) so that the client is not the bottleneck; each client
posts its share of the instances in requests of ``--per-request`` parts, one after the other.
The C-STORE sender is DCMTK ``storescu`` with ``TCP_NODELAY=1``. Every case sends fresh copies
with new UIDs. The clock runs from the first request until the last client has its last
response; the receivers' CPU time per instance is read from ``/proc``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.common import fresh_postgres_database, median, process_group_cpu_s, write_record
from benchmarks.dicom_receive import (
    MAX_PDU,
    StoreSCP,
    _split,
    fresh_copies,
    make_base,
    send_storescu,
    tool,
)

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = f"medbatch-bench-{uuid.uuid4().hex}"  # never inside a DICOM file


def stow_bodies(paths: list[Path], clients: int, per_request: int, out: Path) -> list[list[Path]]:
    """Per client, its multipart/related bodies (``per_request`` instances each), on disk."""
    out.mkdir(parents=True, exist_ok=True)
    bodies: list[list[Path]] = []
    for c, part in enumerate(_split(paths, clients)):
        mine: list[Path] = []
        for r in range(0, len(part), per_request):
            body = out / f"client{c}-{r}.multipart"
            with body.open("wb") as f:
                for p in part[r : r + per_request]:
                    f.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                    f.write(p.read_bytes())
                    f.write(b"\r\n")
                f.write(f"--{BOUNDARY}--\r\n".encode())
            mine.append(body)
        bodies.append(mine)
    return bodies


def send_stow(url: str, token: str, bodies: list[list[Path]]) -> float:
    """Each client's bodies posted by curl, one after the other; clients run at once."""
    head = [
        tool("curl", "curl"),
        "--silent",
        "--show-error",
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        "-H",
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "-H",
        "Accept: application/dicom+json",
        "-H",
        f"Authorization: Bearer {token}",
    ]
    errors: list[str] = []

    def one(mine: list[Path]) -> None:
        for body in mine:
            done = subprocess.run(
                [*head, "--data-binary", f"@{body}", url],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0 or done.stdout.strip() != "200":
                errors.append(f"{body.name}: HTTP {done.stdout.strip()} {done.stderr[-300:]}")

    threads = [threading.Thread(target=one, args=(mine,)) for mine in bodies]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"STOW-RS client: {errors[:3]}")
    return seconds


class MedbatchDoors:
    """One medbatch stack with both front doors: the DICOM listener and ``medbatch serve``."""

    def __init__(self, database: str, url: str, work: Path, processes: int) -> None:
        from core.settings import Settings
        from medbatch.services.tokens import Scope, create_token
        from medbatch.stack.embedded import EmbeddedStack
        from medbatch.stack.process import free_port

        self.database = database
        self.settings = Settings(  # type: ignore[call-arg]
            storage_dir=work,
            database_url=url,
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            dicom_port=free_port(),
            api_port=free_port(),
            metrics_port=0,
            dicom_allowed_aes="STORESCU",
            dicom_quiet_period_s=3600,  # no study closes (and no scoring runs) while measuring
            dicom_max_pdu=MAX_PDU,
            dicom_listener_processes=processes,
            api_max_upload_bytes=1 << 31,
        )
        self.stack = EmbeddedStack(
            self.settings,
            workers=0,
            beat=False,
            start_triton=False,
            listener=True,
            api=True,
            report=lambda _m: None,
        )
        self.stack.start()
        self.token = create_token(
            self.settings, f"bench-{uuid.uuid4().hex[:8]}", frozenset({Scope.SUBMIT}), actor="bench"
        )[1]
        self.stow_url = f"{self.settings.api_url}/dicomweb/studies"

    def cpu_s(self, door: str) -> float:
        proc = self.stack.listener if door == "cstore" else self.stack.api
        assert proc is not None
        return process_group_cpu_s(proc.pid)

    def stored(self) -> int:
        from sqlalchemy import func, select

        from db.models import DicomInstance
        from db.session import session_scope

        with session_scope(self.settings.database_url) as session:
            return int(session.scalar(select(func.count()).select_from(DicomInstance)) or 0)

    def stop(self) -> None:
        self.stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--per-request", type=int, default=25, help="instances per STOW request")
    parser.add_argument("--clients", default="1,4", help="concurrent clients / associations")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--listener-processes", type=int, default=max(1, min(os.cpu_count() or 1, 4))
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    n = 40 if args.quick else args.instances
    reps = 1 if args.quick else args.reps
    per_request = min(args.per_request, n)
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    if not set(databases) <= {"sqlite", "postgresql"}:
        raise SystemExit("--databases: sqlite and/or postgresql")
    clients_list = [int(c) for c in args.clients.split(",")]
    base = make_base(n)
    size_mb = sum(p.stat().st_size for p in base) / 1e6
    console.print(
        f"{n} CT instances of 512×512, {size_mb:.0f} MB; STOW-RS in requests of {per_request}; "
        f"medbatch on {', '.join(databases)}; load {os.getloadavg()}"
    )
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    loads: list[dict[str, Any]] = []
    sent: dict[str, int] = {}
    (REPO / ".bench").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / ".bench") as tmp, ExitStack() as stack:
        from medbatch.stack.process import free_port

        work = Path(tmp)
        doors: list[MedbatchDoors] = []
        for db in databases:
            url = (
                f"sqlite:///{work / db / 'medbatch.db'}"
                if db == "sqlite"
                else stack.enter_context(fresh_postgres_database())
            )
            m = MedbatchDoors(db, url, work / db, args.listener_processes)
            stack.callback(m.stop)
            doors.append(m)
        scp = StoreSCP(free_port(), work / "storescp")
        stack.callback(scp.stop)

        # (name, receiver) in a fixed order; the order turns each repetition to spread drift.
        cases: list[tuple[str, MedbatchDoors | StoreSCP, str]] = [
            (f"medbatch-{m.database}", m, door) for m in doors for door in ("stow", "cstore")
        ]
        cases.append(("storescp", scp, "cstore"))
        for rep in range(reps):
            for clients in clients_list:
                for name, rcv, door in cases[rep % len(cases) :] + cases[: rep % len(cases)]:
                    copies = fresh_copies(base, work / f"in-{rep}-{clients}-{name}-{door}")
                    key = f"{name}-{door}/{clients}" if name != "storescp" else f"{name}/{clients}"
                    if isinstance(rcv, MedbatchDoors) and door == "stow":
                        bodies = stow_bodies(copies, clients, per_request, copies[0].parent / "b")
                        c0 = rcv.cpu_s(door)
                        secs = send_stow(rcv.stow_url, rcv.token, bodies)
                        cpu_used = rcv.cpu_s(door) - c0
                    elif isinstance(rcv, MedbatchDoors):
                        c0 = rcv.cpu_s(door)
                        port, aet = rcv.settings.dicom_port, rcv.settings.dicom_ae_title
                        secs = send_storescu(port, aet, copies, clients)
                        cpu_used = rcv.cpu_s(door) - c0
                    else:
                        c0 = rcv.cpu_s()
                        secs = send_storescu(rcv.port, rcv.aet, copies, clients)
                        cpu_used = rcv.cpu_s() - c0
                    cpu.setdefault(key, []).append(cpu_used / n * 1e3)
                    times.setdefault(key, []).append(secs)
                    sent[name] = sent.get(name, 0) + n
                    shutil.rmtree(copies[0].parent)
            loads.append({"rep": rep, "load_average": os.getloadavg()})
            console.log(f"repetition {rep + 1}/{reps} done, load {os.getloadavg()}")
        stored = {f"medbatch-{m.database}": m.stored() for m in doors}
        stored["storescp"] = scp.stored()
    short = {k: v for k, v in stored.items() if v < sent.get(k, 0)}
    if short:
        raise RuntimeError(f"receivers stored fewer instances than sent: {short} of {sent}")

    rows = []
    for clients in clients_list:
        scp_s = median(times[f"storescp/{clients}"])
        for db in databases:
            stow = median(times[f"medbatch-{db}-stow/{clients}"])
            cstore = median(times[f"medbatch-{db}-cstore/{clients}"])
            rows.append(
                {
                    "clients": clients,
                    "database": db,
                    "stow_instances_per_s": n / stow,
                    "cstore_instances_per_s": n / cstore,
                    "storescp_instances_per_s": n / scp_s,
                    "stow_vs_cstore": cstore / stow,
                    "stow_vs_storescp": scp_s / stow,
                    "cstore_vs_storescp": scp_s / cstore,
                    "cpu_ms_per_instance": {
                        "stow": median(cpu[f"medbatch-{db}-stow/{clients}"]),
                        "cstore": median(cpu[f"medbatch-{db}-cstore/{clients}"]),
                        "storescp": median(cpu[f"storescp/{clients}"]),
                    },
                    "seconds": {
                        "stow": times[f"medbatch-{db}-stow/{clients}"],
                        "cstore": times[f"medbatch-{db}-cstore/{clients}"],
                        "storescp": times[f"storescp/{clients}"],
                    },
                }
            )
    table = Table(title=f"DICOM receive by STOW-RS and C-STORE: {n} CT 512×512, medians of {reps}")
    for col in (
        "clients/db",
        "STOW-RS/s",
        "C-STORE/s",
        "storescp/s",
        "STOW/C-STORE",
        "STOW/storescp",
        "C-STORE/storescp",
        "CPU ms/inst STOW|C-STORE|storescp",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        c = r["cpu_ms_per_instance"]
        table.add_row(
            f"{r['clients']}/{r['database']}",
            f"{r['stow_instances_per_s']:.0f}",
            f"{r['cstore_instances_per_s']:.0f}",
            f"{r['storescp_instances_per_s']:.0f}",
            f"{r['stow_vs_cstore']:.2f}×",
            f"{r['stow_vs_storescp']:.2f}×",
            f"{r['cstore_vs_storescp']:.2f}×",
            f"{c['stow']:.1f} | {c['cstore']:.1f} | {c['storescp']:.1f}",
        )
    console.print(table)
    path = write_record(
        "dicomweb_receive",
        {
            "instances": n,
            "megabytes": round(size_mb, 1),
            "reps": reps,
            "per_request": per_request,
            "listener_processes": args.listener_processes,
            "databases": databases,
            "curl": subprocess.run(
                [tool("curl", "curl"), "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0],
            "sent": sent,
            "stored": stored,
            "cases": rows,
            "load_average": os.getloadavg(),
            "load_per_repetition": loads,
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


if __name__ == "__main__":
    main()
