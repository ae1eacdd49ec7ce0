"""Workload 2, DICOM receive: CT instances of 512×512 pushed into medbatch's listener (durable:
written, fsync'd with their directory entry and registered in the database before Success)
against two peers on the same disk, the same instances, alternating:

- DCMTK ``storescp`` with ``TCP_NODELAY=1`` (its best configuration: writes the file and
  answers, no fsync, one association at a time);
- Orthanc (Debian's package) with ``SyncStorageArea`` on: the durable peer (fsync of every file
  plus its SQLite index), ``TCP_NODELAY=1``.

    python -m benchmarks.dicom_receive            # 200 instances, 3 alternating repetitions
    python -m benchmarks.dicom_receive --quick    # a smoke run (40 instances, 1 repetition)
    python -m benchmarks.dicom_receive --profile  # + one run per case under py-spy
    python -m benchmarks.dicom_receive --storage local,s3  # medbatch on a directory and on S3

Senders: DCMTK ``storescu`` with ``TCP_NODELAY=1`` (the primary sender: it does not wait on
Nagle) and pynetdicom (in this process), over one association and over four concurrent ones
(a quarter of the instances each). medbatch runs on SQLite and on PostgreSQL (a fresh database
per run), with ``--listener-processes`` processes sharing the port. Every case sends fresh
copies with new UIDs (medbatch and Orthanc store a SOP Instance UID once, so a repeated UID would
short-cut the store). The clock runs from the first association request until the last sender
has its last response; the receivers' CPU time per instance is read from ``/proc``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    BENCH_PROFILE_DIR,
    fresh_postgres_database,
    median,
    process_group_cpu_s,
    start_spies,
    summarise_profile,
    write_record,
)

if TYPE_CHECKING:
    from medbatch.stack.s3_server import S3Server

REPO = Path(__file__).resolve().parents[1]
BASE_DIR = REPO / ".bench" / "ct-512"
SERIES = 5
MAX_PDU = 131072  # every receiver and sender alike (DCMTK's own ceiling)
NODELAY = {"TCP_NODELAY": "1"}  # DCMTK (storescu, storescp, Orthanc's DICOM server) reads it


def tool(name: str, package: str) -> str:
    from medbatch.stack.process import native_tool

    found = native_tool(name)  # not pynetdicom's scripts named like DCMTK's tools
    if not found:
        raise SystemExit(f"{name} is not installed (Debian package {package}; scripts/install.sh)")
    return found


def make_base(n: int) -> list[Path]:
    """``n`` synthetic chest-CT slices of 512×512 (``SERIES`` series), generated once."""
    from medbatch.synth.lung_ct import synth_volume, write_series

    existing = sorted(BASE_DIR.rglob("*.dcm"))
    if len(existing) >= n:
        return existing[:n]
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    per = -(-n // SERIES)
    for s in range(SERIES):
        ct = synth_volume(700 + s, per, rows=512, cols=512)
        write_series(ct, BASE_DIR / f"series{s}", patient_id=f"BENCH-{s}", patient_name="Bench^CT")
    return sorted(BASE_DIR.rglob("*.dcm"))[:n]


def fresh_copies(base: list[Path], out: Path) -> list[Path]:
    """The instances again with new study/series/instance UIDs (same pixels, same size)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    studies: dict[str, str] = {}
    series: dict[str, str] = {}
    paths = []
    for i, path in enumerate(base):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = studies.setdefault(ds.StudyInstanceUID, generate_uid())
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / f"{i:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths


def _split(paths: list[Path], parts: int) -> list[list[Path]]:
    return [paths[i::parts] for i in range(parts)]


# --- senders -------------------------------------------------------------------------------------
def send_pynetdicom(port: int, called: str, paths: list[Path], associations: int) -> float:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    errors: list[str] = []

    def one(part: list[Path]) -> None:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(CTImageStorage)
        ae.maximum_pdu_size = MAX_PDU
        ae.acse_timeout = ae.dimse_timeout = 30  # a lost response (pynetdicom#850) fails the case
        ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            errors.append("association rejected")
            return
        for path in part:
            if not assoc.is_established:
                errors.append("association lost")
                return
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                errors.append(f"status {getattr(status, 'Status', None)}")
        assoc.release()

    threads = [threading.Thread(target=one, args=(p,)) for p in _split(paths, associations)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"pynetdicom sender: {errors[:3]}")
    return seconds


def send_storescu(port: int, called: str, paths: list[Path], associations: int) -> float:
    head = [tool("storescu", "dcmtk"), "-aet", "STORESCU", "-aec", called]
    head += ["--max-pdu", str(MAX_PDU), "127.0.0.1", str(port)]
    cmds = [[*head, *map(str, part)] for part in _split(paths, associations)]
    env = {**os.environ, **NODELAY}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for c in cmds
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {out.decode(errors='replace')[-500:]}")
    return seconds


SENDERS: dict[str, Callable[[int, str, list[Path], int], float]] = {
    "storescu": send_storescu,
    "pynetdicom": send_pynetdicom,
}


# --- receivers -----------------------------------------------------------------------------------
def _wait_listening(port: int, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    from medbatch.stack.process import port_open

    deadline = time.monotonic() + 60
    while not port_open("127.0.0.1", port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening")
        time.sleep(0.05)


class Receiver:
    """A running receiver: where to send, and the CPU its processes have used."""

    name: str
    aet: str
    port: int

    def cpu_s(self) -> float:
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError


class StoreSCP(Receiver):
    """DCMTK's storescp writing to ``out`` (one association at a time, as it runs by default)."""

    def __init__(self, port: int, out: Path) -> None:
        self.name, self.aet, self.port, self.out = "storescp", "STORESCP", port, out
        out.mkdir(parents=True, exist_ok=True)
        argv = [tool("storescp", "dcmtk"), "--max-pdu", str(MAX_PDU), "-aet", self.aet]
        self.proc = subprocess.Popen(
            [*argv, "-od", str(out), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **NODELAY},
            start_new_session=True,
        )
        _wait_listening(port, "storescp", self.proc)

    def cpu_s(self) -> float:
        return process_group_cpu_s(self.proc.pid)

    def stored(self) -> int:
        return sum(1 for _ in self.out.rglob("*") if _.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Orthanc(Receiver):
    """Orthanc with ``SyncStorageArea`` on (fsync of each file) and its default SQLite index."""

    def __init__(self, port: int, http_port: int, work: Path) -> None:
        self.name, self.aet, self.port = "orthanc", "ORTHANC", port
        self.storage = work / "storage"
        config = {
            "Name": "medbatch-bench",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(work / "index"),
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomThreadsCount": 8,  # 4 associations at once and one closing
            "MaximumPduLength": MAX_PDU,
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": 3600,
            "SaveJobs": False,
            "OverwriteInstances": False,
        }
        work.mkdir(parents=True, exist_ok=True)
        (work / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = (work / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [tool("Orthanc", "orthanc"), str(work / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NODELAY},
            start_new_session=True,
        )
        _wait_listening(port, "Orthanc", self.proc)

    def cpu_s(self) -> float:
        return process_group_cpu_s(self.proc.pid)

    def stored(self) -> int:
        return sum(1 for p in self.storage.rglob("*") if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


class PynetdicomFloor(Receiver):
    """A pynetdicom storage SCP that answers Success without storing anything: the ceiling of
    any listener built on pynetdicom (its association, PDU and DIMSE handling alone)."""

    def __init__(self, port: int) -> None:
        import sys

        self.name, self.aet, self.port = "pynetdicom-noop", "NOOP", port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.dicom_receive", "--serve-noop", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_listening(port, "the no-op pynetdicom SCP", self.proc)

    def cpu_s(self) -> float:
        return process_group_cpu_s(self.proc.pid)

    def stored(self) -> int:
        return -1  # stores nothing by design

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def serve_noop(port: int) -> None:
    """The :class:`PynetdicomFloor` process: configured as medbatch's listener (contexts, PDU,
    pynetdicom's log handlers unbound), handler ``return 0x0000``."""
    import logging
    import signal

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from ingest.dicom.listener import TRANSFER_SYNTAXES, _quiet

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ae = AE(ae_title="NOOP")
    ae.maximum_associations = 16
    ae.maximum_pdu_size = MAX_PDU
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)]
    )
    assert server is not None
    _quiet(server)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


class Medbatch(Receiver):
    """medbatch's listener (``medbatch listen`` in its own process group, with its helpers)."""

    def __init__(
        self, database: str, url: str, work: Path, processes: int, s3: S3Server | None = None
    ) -> None:
        from core.settings import Settings
        from medbatch.stack.embedded import EmbeddedStack
        from medbatch.stack.process import free_port

        self.name = f"medbatch-{database}" + ("-s3" if s3 else "")
        self.settings = Settings(  # type: ignore[call-arg]
            storage_dir=work,
            storage_url=s3.url(f"bench-{database}") if s3 else "",
            s3_endpoint_url=s3.endpoint_url if s3 else "",
            database_url=url,
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            dicom_port=free_port(),
            dicom_allowed_aes="BENCH, STORESCU",
            dicom_quiet_period_s=3600,  # no study closes (and no scoring runs) while measuring
            dicom_max_pdu=MAX_PDU,
            dicom_listener_processes=processes,
        )
        self.aet, self.port = self.settings.dicom_ae_title, self.settings.dicom_port
        self.stack = EmbeddedStack(
            self.settings,
            workers=0,
            beat=False,
            start_triton=False,
            listener=True,
            report=lambda _m: None,
        )
        self.stack.start()

    @property
    def pid(self) -> int:
        assert self.stack.listener is not None
        return self.stack.listener.pid

    def cpu_s(self) -> float:
        return process_group_cpu_s(self.pid)  # the listener and its helper processes

    def stored(self) -> int:
        from sqlalchemy import func, select

        from db.models import DicomInstance
        from db.session import session_scope

        with session_scope(self.settings.database_url) as session:
            return int(session.scalar(select(func.count()).select_from(DicomInstance)) or 0)

    def stop(self) -> None:
        self.stack.stop()


def start_receivers(
    work: Path, databases: list[str], processes: int, stack: ExitStack, storages: list[str]
) -> list[Receiver]:
    """medbatch on each database and storage (a local directory; SeaweedFS's S3 on loopback),
    storescp and Orthanc; ``stack`` stops them."""
    from medbatch.stack.process import free_port

    s3: S3Server | None = None
    if "s3" in storages:
        from medbatch.stack.s3_server import S3Server

        s3 = stack.enter_context(S3Server(work / "seaweedfs"))
        os.environ.update(s3.env())  # the listener processes' credentials
    out: list[Receiver] = []
    for db in databases:
        for storage in storages:
            where = work / f"{db}-{storage}"
            url = (
                f"sqlite:///{where / 'medbatch.db'}"
                if db == "sqlite"
                else stack.enter_context(fresh_postgres_database())
            )
            m = Medbatch(db, url, where, processes, s3 if storage == "s3" else None)
            stack.callback(m.stop)
            out.append(m)
    scp = StoreSCP(free_port(), work / "storescp")
    stack.callback(scp.stop)
    orthanc = Orthanc(free_port(), free_port(), work / "orthanc")
    stack.callback(orthanc.stop)
    floor = PynetdicomFloor(free_port())
    stack.callback(floor.stop)
    return [*out, scp, orthanc, floor]


def _med(samples: dict[str, list[float]], key: str) -> float:
    """Median of a case's successful samples (NaN if every send of it failed)."""
    values = samples.get(key)
    return median(values) if values else float("nan")


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    import pynetdicom

    return {
        "storescp": first_line([tool("storescp", "dcmtk"), "--version"]),
        "orthanc": first_line([tool("Orthanc", "orthanc"), "--version"]),
        "pynetdicom": pynetdicom.__version__,
    }


# --- the run -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--storage",
        default="local",
        help="medbatch's storage, comma-separated: local (a directory, fsync'd) and/or s3 "
        "(SeaweedFS on loopback, medbatch/stack/s3_server.py)",
    )
    parser.add_argument("--senders", default="storescu,pynetdicom")
    parser.add_argument("--associations", default="1,4")
    parser.add_argument(
        "--listener-processes",
        type=int,
        default=max(1, min(os.cpu_count() or 1, 4)),
        help="medbatch listener processes sharing the port (default: the cores, at most 4)",
    )
    parser.add_argument("--profile", action="store_true", help="+ one py-spy run per case")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--serve-noop", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop is not None:
        serve_noop(args.serve_noop)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    n = 40 if args.quick else args.instances
    reps = 1 if args.quick else args.reps
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    storages = [d.strip() for d in args.storage.split(",") if d.strip()]
    if not storages or not set(storages) <= {"local", "s3"}:
        raise SystemExit("--storage: local and/or s3")
    if not set(databases) <= {"sqlite", "postgresql"}:
        raise SystemExit("--databases: sqlite and/or postgresql")
    senders = [s.strip() for s in args.senders.split(",") if s.strip()]
    assocs_list = [int(a) for a in args.associations.split(",")]
    cases = [(s, a) for s in senders for a in assocs_list]
    base = make_base(n)
    size_mb = sum(p.stat().st_size for p in base) / 1e6
    console.print(
        f"{n} CT instances of 512×512, {size_mb:.0f} MB; medbatch on {', '.join(databases)} "
        f"with {args.listener_processes} listener process(es); load {os.getloadavg()}"
    )
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    loads: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    (REPO / ".bench").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / ".bench") as tmp, ExitStack() as stack:
        work = Path(tmp)
        rx = start_receivers(work, databases, args.listener_processes, stack, storages)
        sent = {rcv.name: 0 for rcv in rx}
        for rep in range(reps):
            for c, (sender, assocs) in enumerate(cases):
                copies = fresh_copies(base, work / f"in-{rep}-{c}")
                order = rx[rep % len(rx) :] + rx[: rep % len(rx)]  # spread drift over all
                for rcv in order:
                    key = f"{rcv.name}/{sender}/{assocs}"
                    c0 = rcv.cpu_s()
                    try:
                        secs = SENDERS[sender](rcv.port, rcv.aet, copies, assocs)
                    except RuntimeError as exc:  # recorded, and left out of the medians
                        failures.append({"case": key, "rep": rep, "error": str(exc)[:500]})
                        console.log(f"[red]{key} failed[/]: {exc}")
                        continue
                    cpu.setdefault(key, []).append((rcv.cpu_s() - c0) / n * 1e3)
                    times.setdefault(key, []).append(secs)
                    sent[rcv.name] += n
                shutil.rmtree(copies[0].parent)
            loads.append({"rep": rep, "load_average": os.getloadavg()})
            console.log(f"repetition {rep + 1}/{reps} done, load {os.getloadavg()}")
        if args.profile:
            listeners = [rcv for rcv in rx if isinstance(rcv, Medbatch)]
            profiles = profile_medbatch(listeners, base, work, cases, n)
            for name in profiles:
                sent[name.split("/")[0]] += n
        stored = {rcv.name: rcv.stored() for rcv in rx}
    short = {k: v for k, v in stored.items() if 0 <= v < sent[k]}
    if short:
        raise RuntimeError(f"receivers stored fewer instances than sent: {short} of {sent}")

    rows = []
    for sender, assocs in cases:
        scp = _med(times, f"storescp/{sender}/{assocs}")
        orth = _med(times, f"orthanc/{sender}/{assocs}")
        floor = _med(times, f"pynetdicom-noop/{sender}/{assocs}")
        for db, storage in [(d, st) for d in databases for st in storages]:
            key = f"medbatch-{db}{'-s3' if storage == 's3' else ''}/{sender}/{assocs}"
            m = _med(times, key)
            local = _med(times, f"medbatch-{db}/{sender}/{assocs}") if "local" in storages else m
            rows.append(
                {
                    "sender": sender,
                    "associations": assocs,
                    "database": db,
                    "storage": storage,
                    "ratio_vs_local_storage": local / m,
                    "medbatch_instances_per_s": n / m,
                    "storescp_instances_per_s": n / scp,
                    "orthanc_instances_per_s": n / orth,
                    "pynetdicom_noop_instances_per_s": n / floor,
                    "ratio_vs_storescp": scp / m,
                    "ratio_vs_orthanc": orth / m,
                    "cpu_ms_per_instance": {
                        "medbatch": _med(cpu, key),
                        "storescp": _med(cpu, f"storescp/{sender}/{assocs}"),
                        "orthanc": _med(cpu, f"orthanc/{sender}/{assocs}"),
                        "pynetdicom_noop": _med(cpu, f"pynetdicom-noop/{sender}/{assocs}"),
                    },
                    "medbatch_seconds": times.get(key, []),
                    "storescp_seconds": times.get(f"storescp/{sender}/{assocs}", []),
                    "orthanc_seconds": times.get(f"orthanc/{sender}/{assocs}", []),
                    "pynetdicom_noop_seconds": times.get(f"pynetdicom-noop/{sender}/{assocs}", []),
                }
            )
    table = Table(title=f"DICOM receive: {n} CT instances 512×512, medians of {reps}")
    for col in (
        "sender/assocs/db/storage",
        "medbatch/s",
        "s3 / local",
        "storescp/s",
        "ratio",
        "orthanc/s",
        "ratio",
        "pynetdicom no-op/s",
        "CPU ms/instance medbatch|storescp|orthanc|no-op",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        c = r["cpu_ms_per_instance"]
        table.add_row(
            f"{r['sender']}/{r['associations']}/{r['database']}/{r['storage']}",
            f"{r['medbatch_instances_per_s']:.0f}",
            f"{r['ratio_vs_local_storage']:.2f}×",
            f"{r['storescp_instances_per_s']:.0f}",
            f"{r['ratio_vs_storescp']:.2f}×",
            f"{r['orthanc_instances_per_s']:.0f}",
            f"{r['ratio_vs_orthanc']:.2f}×",
            f"{r['pynetdicom_noop_instances_per_s']:.0f}",
            " | ".join(
                f"{c[k]:.1f}" for k in ("medbatch", "storescp", "orthanc", "pynetdicom_noop")
            ),
        )
    console.print(table)
    path = write_record(
        "dicom_receive",
        {
            "instances": n,
            "megabytes": round(size_mb, 1),
            "reps": reps,
            "listener_processes": args.listener_processes,
            "databases": databases,
            "storages": storages,
            "versions": versions(),
            "sent": sent,
            "stored": stored,
            "cases": rows,
            "load_average": os.getloadavg(),
            "load_per_repetition": loads,
            "failed_sends": failures,
            "profiles": profiles,
            "targets": {
                "ratio_vs_storescp": ">= 1.0 (storescp with TCP_NODELAY=1), 1 and 4 associations",
                "guarantee": "Success only after fsync of file + directory and the committed row",
            },
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


def profile_medbatch(
    listeners: list[Medbatch],
    base: list[Path],
    work: Path,
    cases: list[tuple[str, int]],
    n: int,
) -> dict[str, Any]:
    """One more send per case into each medbatch listener with py-spy on its processes."""
    out: dict[str, Any] = {}
    for m in listeners:
        for sender, assocs in cases:
            name = f"{m.name}/{sender}/{assocs}"
            file = name.replace("/", "-")
            copies = fresh_copies(base, work / f"profile-{file}")
            spies = start_spies([(file, m.pid, True)], BENCH_PROFILE_DIR / "dicom_receive")
            secs = SENDERS[sender](m.port, m.aet, copies, assocs)
            for spy in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes its file
                spy.wait(timeout=60)
            out[name] = {
                "instances_per_s": n / secs,
                **summarise_profile(
                    BENCH_PROFILE_DIR / "dicom_receive" / f"{file}.txt",
                    ("ingest/dicom", "db/"),
                    top=15,
                ),
            }
            shutil.rmtree(copies[0].parent)
    return out


if __name__ == "__main__":
    main()
