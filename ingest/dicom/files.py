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
from dataclasses import dataclass
from pathlib import Path

from core.storage import fsync_dir, make_dirs, write_atomic, write_temp
from ingest.dicom.validate import ReceivedInstance

__all__ = ["fsync_dir", "make_dirs", "place", "relative_path", "write_atomic"]


def relative_path(inst: ReceivedInstance) -> Path:
    """study/series/instance layout; UIDs are digits and dots, safe as file names."""
    return Path(inst.study_uid) / inst.series_uid / f"{inst.sop_instance_uid}.dcm"


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
    tmp, fd = write_temp(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return PlacedFile(path, fd)
