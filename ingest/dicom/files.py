"""Received instances on disk: the study/series/instance layout and durable writes.

A file is durable once its bytes are fsync'd and the directory entry naming it is fsync'd too.
:func:`place` writes and renames a file into place and leaves both syncs to the caller, so that
the file's fsync and its directory's (which the group committer does for every file of a batch
at once) run at the same time instead of one after the other: on ext4 two flushes in flight
together cost little more than one. Nothing reads a file before its database row exists, and
the row is committed only after both syncs, so a file that a power cut leaves incomplete has no
row and is replaced when the sender resends it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from ingest.dicom.validate import ReceivedInstance


def relative_path(inst: ReceivedInstance) -> Path:
    """study/series/instance layout; UIDs are digits and dots, safe as file names."""
    return Path(inst.study_uid) / inst.series_uid / f"{inst.sop_instance_uid}.dcm"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p, fsync'ing each parent of a directory it creates (so the entry survives a crash)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def _write_temp(directory: Path, name: str, data: bytes | memoryview) -> tuple[Path, int]:
    tmp = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return tmp, fd


@dataclass
class PlacedFile:
    """A file complete at its final path whose bytes are not yet durable (see :meth:`sync`)."""

    path: Path
    fd: int

    def sync(self) -> None:
        """fsync the file's bytes (its directory entry is ``fsync_dir(path.parent)``'s job)."""
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def place(path: Path, data: bytes | memoryview) -> PlacedFile:
    """Write ``data`` to a temporary file and rename it onto ``path`` (so the final name only
    ever holds complete files, even if this process is killed); durability is the caller's."""
    make_dirs(path.parent)
    tmp, fd = _write_temp(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return PlacedFile(path, fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename, fsync the directory."""
    make_dirs(path.parent)
    tmp, fd = _write_temp(path.parent, path.name, data)
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
