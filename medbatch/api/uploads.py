"""An uploaded library or extract, streamed to disk: hashed as it arrives, refused past the
size limit, fsync'd and kept under its content hash, so the same content is the same file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request

from core.settings import Settings
from medbatch.api.multipart import Part, Sink, boundary_of, read_multipart
from medbatch.api.problems import HttpProblem

FIELD_LIMIT = 64 << 10  # bytes of one form field (an option, not a file)


@dataclass
class Upload:
    path: Path  # upload_dir/<sha256>/<file name> (shared storage: <sha256>/<request>/<name>)
    filename: str
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)
    created: bool = True  # False: the same content was uploaded before (and may be in use)
    scratch: bool = False  # True: shared (S3) storage, this copy is this request's alone

    def release(self) -> None:
        """Remove this request's copy once submitted, with shared storage: the extract is then
        in the object store and a library's rows in the database, so the API host keeps none."""
        if self.scratch:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
                self.path.parent.parent.rmdir()  # <sha256>/, unless another request's is there

    def discard(self) -> None:
        """Remove a file this request stored, when it was refused before any job used it."""
        if self.created:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def safe_filename(name: str | None) -> str:
    """The name as sent, if it is a plain file name; 400 for anything that could be a path."""
    if not name or not name.strip():
        raise HttpProblem(400, "the 'file' part has no filename in its Content-Disposition")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name or "\x00" in name:
        raise HttpProblem(
            400, f"the file name {name!r} is a path; send a plain file name (no '/', '\\', '..')"
        )
    if len(name) > 200:
        raise HttpProblem(400, "the file name is longer than 200 characters")
    return name


class _FileSink:
    """The uploaded file: a temporary file beside its final place, hashed as it is written."""

    def __init__(self, tmp: Path, limit: int) -> None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.path = tmp
        self.fh: IO[bytes] = tmp.open("xb")
        self.digest = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.complete = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise HttpProblem(413, f"the file passed the upload limit of {self.limit:,} bytes")
        self.digest.update(data)
        self.fh.write(data)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.complete = True

    def abort(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


class _FieldSink:
    def __init__(self, name: str, into: dict[str, str]) -> None:
        self.name, self.into, self.data = name, into, b""

    def write(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > FIELD_LIMIT:
            raise HttpProblem(413, f"the form field {self.name!r} is over {FIELD_LIMIT:,} bytes")

    def close(self) -> None:
        try:
            self.into[self.name] = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HttpProblem(400, f"the form field {self.name!r} is not UTF-8 text") from exc

    def abort(self) -> None:
        self.data = b""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def receive_upload(request: Request, settings: Settings) -> Upload:
    """The ``file`` part of a multipart/form-data body, durably stored, and the other fields."""
    boundary = boundary_of(request, "multipart/form-data")
    fields: dict[str, str] = {}
    files: list[tuple[_FileSink, str]] = []
    tmp_dir = settings.upload_dir / "tmp"

    def open_part(part: Part) -> Sink:
        if part.name == "file":
            if files:
                raise HttpProblem(400, "send one 'file' part per request")
            name = safe_filename(part.filename)
            sink = _FileSink(tmp_dir / f"{uuid.uuid4().hex}.part", settings.api_max_upload_bytes)
            files.append((sink, name))
            return sink
        if not part.name:
            raise HttpProblem(400, "a form part has no name in its Content-Disposition")
        return _FieldSink(part.name, fields)

    try:
        await read_multipart(
            request, boundary, open_part, max_body=settings.api_max_upload_bytes + (1 << 20)
        )
    except BaseException:
        for sink, _ in files:
            sink.abort()
        raise
    if not files or not files[0][0].complete:
        raise HttpProblem(400, "the multipart form has no 'file' part holding the file to submit")
    sink, name = files[0]
    sha = sink.digest.hexdigest()
    scratch = settings.storage_is_remote
    # Shared storage: a folder per request, so that releasing one never pulls a file from under
    # another request for the same content (the store keys the content by its hash anyway).
    final = settings.upload_dir / sha / (uuid.uuid4().hex if scratch else "") / name
    final.parent.mkdir(parents=True, exist_ok=True)
    created = not final.exists()
    os.replace(sink.path, final)  # the same content twice at once: the same bytes either way
    _fsync_dir(final.parent)
    return Upload(final, name, sha, sink.size, fields, created, scratch)
