"""The files of a FHIR Bulk Data ``$export``: a folder, a .zip or a .tar (optionally gzipped)
of one, or a single NDJSON file.

A ``$export`` is one NDJSON file or several per resource type (``Patient.ndjson``,
``Observation-2.ndjson.gz``, …) and, when the client saved it, the manifest the server
returned (``{"transactionTime", "request", "output": [{"type", "url", "count"}]}``). With a
manifest its ``output`` says which file holds which type (``url`` relative to the manifest, a
bare file name, or the server's absolute URL, matched by its last path segment); without one,
each ``*.ndjson[.gz]`` / ``*.jsonl[.gz]`` file's type is read from its first resource (or,
when that line is broken, its name). Only ``Patient`` and ``Observation`` files are read,
Patient files first (their birth dates and genders are needed to give every visit an age and a
sex); files of other types are counted as ignored.

Archives are read in place, member by member, with the standard library (nothing is extracted);
a member name or manifest ``url`` that would leave the export (``../``, an absolute path, a
symbolic link pointing outside the folder) refuses the whole export: it is not what a FHIR
server writes.

Identity: SHA-256 over the SHA-256 of each Patient and Observation file's bytes, sorted, so the
same export is one extract whether it arrives as a folder, a .zip or a .tar, under any names
and whatever the manifest's ``transactionTime`` says.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

from core.errors import InputError
from ingest.text import GZIP_MAGIC, open_stream

__all__ = [
    "READ_TYPES",
    "ExportFile",
    "FhirExport",
    "export_sha256",
    "fingerprint",
    "looks_like_export",
    "open_export",
]

READ_TYPES = ("Patient", "Observation")
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_ENTRIES = 100_000
_MAX_MANIFEST_BYTES = 16 << 20
_MAX_FIRST_LINE = 64 << 20
#: Bytes of NDJSON per byte of long CSV for the same cohort (measured on the generator: 571 MB
#: of Observations for 53 MB of CSV; real exports are more verbose, which only makes batches
#: smaller). Scoring batches are sized by extract bytes, so an export by its CSV equivalent.
NDJSON_BYTES_PER_CSV_BYTE = 10
#: A gzipped member of an archive, whose uncompressed size is not known without reading it.
_GZIP_RATIO_GUESS = 8
_TYPE_IN_NAME = re.compile(r"(?:^|[^A-Za-z])(Patient|Observation)(?:[^A-Za-z]|$)")


@dataclass(frozen=True)
class ExportFile:
    """One NDJSON file of the export; ``name`` is its path inside the export (shown to people
    in rejections), ``size`` its stored bytes."""

    name: str
    resource_type: str
    size: int
    manifest_count: int | None = None


@dataclass(frozen=True)
class FhirExport:
    """What an export holds and how to read it. ``files`` are in reading order: Patient files,
    then Observation files (manifest order, or by name)."""

    path: Path
    container: str  # directory | zip | tar | file
    files: tuple[ExportFile, ...]
    ignored: Mapping[str, int] = field(default_factory=dict)  # type → files not read
    manifest: str | None = None

    @property
    def patient_files(self) -> tuple[ExportFile, ...]:
        return tuple(f for f in self.files if f.resource_type == "Patient")

    @property
    def observation_files(self) -> tuple[ExportFile, ...]:
        return tuple(f for f in self.files if f.resource_type == "Observation")

    @contextmanager
    def opener(self) -> Iterator[Callable[[ExportFile], IO[bytes]]]:
        """``open(file)`` → its stored bytes, with the container opened once."""
        with _open_container(self.path, self.container) as box:
            yield lambda f: box.open(f.name)

    def describe(self) -> dict[str, Any]:
        """For the job's parameters: where it came from and which files are read."""
        return {
            "container": self.container,
            "manifest": self.manifest,
            "files": [
                {"name": f.name, "type": f.resource_type, "size_bytes": f.size} for f in self.files
            ],
            "ignored_files_by_type": dict(sorted(self.ignored.items())),
        }

    def text_bytes(self) -> int:
        """Uncompressed bytes of the Observation files (gzip: from the trailer where the file
        can be read directly; a gzipped archive member: an estimate)."""
        total = 0
        with self.opener() as open_file:
            for f in self.observation_files:
                with open_file(f) as fh:
                    head = fh.read(2)
                if head != GZIP_MAGIC:
                    total += f.size
                elif self.container in ("directory", "file"):
                    total += _gzip_isize(_directory_path(self, f), f.size)
                else:
                    total += f.size * _GZIP_RATIO_GUESS
        return total


# ------------------------------------------------------------------------------- containers
class _Container:
    """The entries of an export, whatever holds them."""

    def entries(self) -> list[tuple[str, int]]:  # (posix name, stored size)
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _safe_name(name: str, where: str) -> str:
    """A member's name, normalised; one that leaves the export refuses the export."""
    clean = posixpath.normpath(name.replace("\\", "/"))
    if clean.startswith(("/", "../")) or clean == ".." or re.match(r"^[A-Za-z]:", clean):
        raise InputError(
            f"{where}: the entry {name!r} points outside the export (absolute or '..'); "
            "refusing the whole export"
        )
    return clean


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class _Directory(_Container):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def entries(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                rel = path.relative_to(self.root).as_posix()
                if not path.is_file():
                    continue  # a dangling link, a socket: not part of an export
                self.path_of(rel)  # a link to outside the folder refuses the export
                out.append((rel, path.stat().st_size))
                if len(out) > _MAX_ENTRIES:
                    raise InputError(f"{self.root.name}: more than {_MAX_ENTRIES} files")
        return out

    def path_of(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise InputError(
                f"{self.root.name}: {name} is a link to outside the export folder; refusing "
                "the whole export"
            )
        return path

    def open(self, name: str) -> IO[bytes]:
        return self.path_of(name).open("rb")


class _Zip(_Container):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path.name}: not a readable .zip ({exc})") from exc
        self._names: dict[str, str] = {}

    def entries(self) -> list[tuple[str, int]]:
        out = []
        for info in self.zf.infolist():
            if info.is_dir():
                continue
            name = _safe_name(info.filename, self.path.name)
            self._names[name] = info.filename
            out.append((name, info.file_size))
        return out

    def open(self, name: str) -> IO[bytes]:
        if not self._names:
            self.entries()
        return self.zf.open(self._names[name])

    def close(self) -> None:
        self.zf.close()


class _Tar(_Container):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"{path.name}: not a readable .tar ({exc})") from exc
        self._members: dict[str, tarfile.TarInfo] = {}

    def entries(self) -> list[tuple[str, int]]:
        out = []
        try:
            members = self.tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InputError(f"{self.path.name}: the archive is damaged ({exc})") from exc
        for m in members:
            if not m.isfile():
                continue  # folders, links, devices: nothing an export needs
            name = _safe_name(m.name, self.path.name)
            self._members[name] = m
            out.append((name, m.size))
        return out

    def open(self, name: str) -> IO[bytes]:
        if not self._members:
            self.entries()
        fh = self.tf.extractfile(self._members[name])
        assert fh is not None, "regular members always have content"
        return fh

    def close(self) -> None:
        self.tf.close()


class _Single(_Container):
    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[tuple[str, int]]:
        return [(self.path.name, self.path.stat().st_size)]

    def open(self, name: str) -> IO[bytes]:
        return self.path.open("rb")


def _container_kind(path: Path) -> str | None:
    """``directory``, ``zip``, ``tar``, ``file`` (NDJSON) or None (not an export)."""
    if path.is_dir():
        return "directory"
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == _ZIP_MAGIC:
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError):
        pass
    return "file" if _first_char(path) == "{" else None


def _first_char(path: Path) -> str:
    """The first non-blank character of a text file (gzip undone, BOM dropped)."""
    try:
        with open_stream(path.open("rb"), path) as source:
            head = source.stream.read(4096)
    except InputError:
        return ""
    return head.decode("utf-8", "replace").lstrip()[:1]


@contextmanager
def _open_container(path: Path, kind: str) -> Iterator[_Container]:
    box: _Container
    if kind == "directory":
        box = _Directory(path)
    elif kind == "zip":
        box = _Zip(path)
    elif kind == "tar":
        box = _Tar(path)
    else:
        box = _Single(path)
    try:
        yield box
    finally:
        box.close()


# ------------------------------------------------------------------------------- discovery
def looks_like_export(path: Path) -> bool:
    """Whether ``path`` is a folder, an archive or an NDJSON file (content, not the name)."""
    return _container_kind(Path(path)) is not None


def _is_ndjson(name: str) -> bool:
    return name.lower().endswith(NDJSON_SUFFIXES)


def _first_resource_type(box: _Container, name: str) -> str | None:
    try:
        with open_stream(box.open(name), Path(name)) as source:
            for raw in iter(lambda: source.stream.readline(_MAX_FIRST_LINE), b""):
                if raw.strip():
                    value = orjson.loads(raw)
                    kind = value.get("resourceType") if isinstance(value, dict) else None
                    return kind if isinstance(kind, str) else None
    except (InputError, orjson.JSONDecodeError, OSError, EOFError):
        return None
    return None


def _manifest(box: _Container, entries: list[tuple[str, int]], where: str) -> tuple[str, Any]:
    """The one Bulk Data manifest among the export's .json files, or ("", None)."""
    found = []
    for name, size in entries:
        if not name.lower().endswith(".json") or size > _MAX_MANIFEST_BYTES:
            continue
        with box.open(name) as fh:
            try:
                value = orjson.loads(fh.read())
            except orjson.JSONDecodeError:
                continue
        if isinstance(value, dict) and isinstance(value.get("output"), list):
            found.append((name, value))
    if len(found) > 1:
        raise InputError(
            f"{where}: several Bulk Data manifests ({', '.join(n for n, _ in found)}); "
            "drop one export per folder or archive"
        )
    return found[0] if found else ("", None)


def _manifest_files(
    manifest_name: str, manifest: dict[str, Any], sizes: dict[str, int], where: str
) -> list[ExportFile]:
    base = posixpath.dirname(manifest_name)
    by_base: dict[str, list[str]] = {}
    for name in sizes:
        by_base.setdefault(posixpath.basename(name), []).append(name)
    files = []
    for k, item in enumerate(manifest["output"]):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise InputError(f"{where}: manifest output[{k}] has no url")
        url, kind = item["url"], item.get("type")
        if not isinstance(kind, str):
            raise InputError(f"{where}: manifest output[{k}] ({url}) has no resource type")
        if "://" in url:
            last = posixpath.basename(urlsplit(url).path)
            candidates = by_base.get(last, [])
            if len(candidates) != 1:
                raise InputError(
                    f"{where}: the manifest lists {url} ({kind}); "
                    + ("no file of the export is called " if not candidates else "several are ")
                    + repr(last)
                )
            name = candidates[0]
        else:
            name = _safe_name(posixpath.join(base, url), f"{where}: manifest url")
            if name not in sizes:
                raise InputError(
                    f"{where}: the manifest lists {url} ({kind}), which is not in the export"
                )
        count = item.get("count")
        files.append(ExportFile(name, kind, sizes[name], count if isinstance(count, int) else None))
    return files


def open_export(path: Path) -> FhirExport:
    """The export at ``path`` (a folder, .zip, .tar[.gz] or .ndjson[.gz]); :class:`InputError`
    when it is none, or holds no Observation file."""
    path = Path(path)
    kind = _container_kind(path)
    if kind is None:
        raise InputError(f"{path.name}: not a FHIR Bulk Data export (folder, .zip, .tar, NDJSON)")
    with _open_container(path, kind) as box:
        entries = [(n, s) for n, s in box.entries() if not _hidden(n)]
        sizes = dict(entries)
        manifest_name, manifest = _manifest(box, entries, path.name)
        if manifest is not None:
            found = _manifest_files(manifest_name, manifest, sizes, path.name)
        else:
            found = []
            for name, size in entries:
                if not _is_ndjson(name) and kind != "file":
                    continue
                rtype = _first_resource_type(box, name)
                if rtype is None:  # an unreadable first line: the name may say it
                    m = _TYPE_IN_NAME.search(posixpath.basename(name))
                    rtype = m.group(1) if m else "(unknown)"
                found.append(ExportFile(name, rtype, size))
    ignored = Counter(f.resource_type for f in found if f.resource_type not in READ_TYPES)
    ordered = tuple(
        sorted(
            (f for f in found if f.resource_type in READ_TYPES),
            key=lambda f: READ_TYPES.index(f.resource_type),  # stable: manifest or name order
        )
    )
    if not any(f.resource_type == "Observation" for f in ordered):
        what = "its manifest lists" if manifest is not None else "it holds"
        types = ", ".join(sorted({f.resource_type for f in found})) or "no NDJSON files"
        raise InputError(
            f"{path.name}: not an EHR extract: a FHIR export needs Observation resources to "
            f"score, and {what} {types} (expected Patient*.ndjson[.gz] and "
            "Observation*.ndjson[.gz], with or without a Bulk Data manifest)"
        )
    return FhirExport(
        path=path,
        container=kind,
        files=ordered,
        ignored=MappingProxyType(dict(ignored)),
        manifest=manifest_name or None,
    )


def _directory_path(export: FhirExport, f: ExportFile) -> Path:
    return export.path if export.container == "file" else _Directory(export.path).path_of(f.name)


def _gzip_isize(path: Path, size: int) -> int:
    from ingest.text import text_size

    return text_size(path) if size >= 18 else size


# ------------------------------------------------------------------------------- identity
def export_sha256(export: FhirExport) -> str:
    """The export's identity: SHA-256 over the sorted SHA-256 of its Patient and Observation
    files (as stored: a gzipped file by its gzip bytes)."""
    digests = []
    with export.opener() as open_file:
        for f in export.files:
            h = hashlib.sha256()
            with open_file(f) as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            digests.append(h.hexdigest())
    outer = hashlib.sha256(b"medbatch fhir export\n")
    for d in sorted(digests):
        outer.update(d.encode() + b"\n")
    return outer.hexdigest()


def fingerprint(path: Path) -> tuple[int, int]:
    """(bytes, newest modification time in ns) of a file, or of everything under a folder: a
    folder is unchanged while neither changes (the drop folder's settle check, the worker's
    check that what it reads is what was submitted)."""
    path = Path(path)
    stat = path.stat()
    if not path.is_dir():
        return stat.st_size, stat.st_mtime_ns
    size, newest = 0, stat.st_mtime_ns
    for folder, dirs, files in os.walk(path):
        for d in dirs:
            newest = max(newest, (Path(folder) / d).stat().st_mtime_ns)
        for name in files:
            try:
                st = (Path(folder) / name).stat()
            except FileNotFoundError:  # a dangling link, or removed while we walk
                continue
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
    return size, newest
