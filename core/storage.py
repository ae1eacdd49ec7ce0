"""Everything medbatch keeps, behind one URL (``MEDBATCH_STORAGE_URL``): a local directory or an
S3-compatible bucket, so that what the listener on one host stores a worker on another can read.

Objects are named by keys, POSIX paths relative to the storage root (``dicom/<study>/<series>/
<instance>.dcm``, ``ehr/extract-7/bucket-0003.arrow``, ``uploads/<sha256>/<name>``); the database
keeps keys, never host paths. :class:`LocalStorage` (the default, ``storage_dir`` itself) writes
through a temporary file, fsync and rename, so a key only ever names a complete, durable file.
:class:`S3Storage` uses obstore (the Rust ``object_store`` crate): measured against SeaweedFS it
put and got 0.5-MB objects faster than boto3 and s3fs (README "Scaling out"). An S3 PUT is atomic:
a key holds the whole object or nothing. Local disk is then only scratch for what one task writes
and reads itself (:func:`scratch`).

Errors: an unreachable store raises :class:`StorageUnavailableError` (a C-STORE answers 0xA700,
a job backs off and retries); a missing object or refused credentials :class:`StorageError`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigurationError, StorageError, StorageUnavailableError

if TYPE_CHECKING:
    from core.settings import Settings

#: Objects fetched at once by :meth:`Storage.fetch_many` from a remote store.
FETCH_THREADS = 8


def is_remote(url: str) -> bool:
    """Whether ``url`` names an S3 bucket (otherwise it is a local directory)."""
    return url.startswith("s3://")


# --- durable local files ---------------------------------------------------------------------


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


def write_temp(directory: Path, name: str, data: bytes | memoryview) -> tuple[Path, int]:
    """``data`` in a new temporary file beside ``name`` in ``directory``: (its path, open fd)."""
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


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename, fsync the directory."""
    make_dirs(path.parent)
    tmp, fd = write_temp(path.parent, path.name, data)
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{key!r} is not a storage key (a relative path without '..')")
    return key


# --- the storage interface -------------------------------------------------------------------


class Storage(ABC):
    """Where medbatch keeps objects; one per process (:func:`storage_for`), thread-safe."""

    url: str
    #: True when keys are files on this host (``local_path`` answers; nothing is copied).
    is_local: bool

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``key``; durable (and whole) once this returns."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` (streamed; durable once this returns)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`StorageError` if there is none."""

    @abstractmethod
    def fetch(self, key: str, scratch_dir: Path) -> Path:
        """A local file holding the object: the file itself for local storage, else a copy in
        ``scratch_dir`` (the caller's, removed with it)."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder-like key), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; none there is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (a folder-like key); none there is fine."""

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except StorageUnavailableError:
            raise
        except StorageError:
            return False
        return True

    def local_path(self, key: str) -> Path | None:
        """The file of ``key`` on this host, for local storage; None for a remote store."""
        return None

    def fetch_many(self, keys: Sequence[str], scratch_dir: Path) -> list[Path]:
        """:meth:`fetch` of each key (concurrently from a remote store), in order."""
        if self.is_local or len(keys) < 2:
            return [self.fetch(k, scratch_dir) for k in keys]
        with ThreadPoolExecutor(min(FETCH_THREADS, len(keys))) as pool:
            return list(pool.map(lambda k: self.fetch(k, scratch_dir), keys))

    def put_tree(self, key: str, path: Path) -> None:
        """Store a file, or every file under a folder, under ``key`` (folder layout kept)."""
        if path.is_file():
            self.put_file(key, path)
            return
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            self.put_file(f"{key}/{item.relative_to(path).as_posix()}", item)

    def fetch_tree(self, key: str, scratch_dir: Path) -> Path:
        """What :meth:`put_tree` stored under ``key``, as a local file or folder."""
        local = self.local_path(key)
        if local is not None:
            return local
        below = self.keys(key)
        if not below:  # a single object
            return self.fetch(key, scratch_dir)
        root = scratch_dir / uuid.uuid4().hex
        for k in below:
            self.fetch(k, root)
        return root / key


class LocalStorage(Storage):
    """Keys are files under ``root``; every write is fsync'd with its directory entry."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def put(self, key: str, data: bytes | memoryview) -> None:
        write_atomic(self.path(key), data)

    def put_file(self, key: str, path: Path) -> None:
        target = self.path(key)
        if target.exists() and target.samefile(path):
            return
        make_dirs(target.parent)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            with path.open("rb") as src, tmp.open("xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no object {key!r} under {self.root}") from exc

    def fetch(self, key: str, scratch_dir: Path) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise StorageError(f"no object {key!r} under {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def keys(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


class S3Storage(Storage):
    """Keys are objects under ``s3://bucket/prefix`` of an S3-compatible service."""

    is_local = False

    def __init__(self, url: str, *, endpoint_url: str = "", timeout_s: float = 30.0) -> None:
        from obstore.store import S3Store

        self.url = url
        options: dict[str, Any] = {
            "timeout": timedelta(seconds=timeout_s),
            "connect_timeout": timedelta(seconds=min(5.0, timeout_s)),
        }
        kwargs: dict[str, Any] = {}
        if endpoint_url:
            kwargs["endpoint"] = endpoint_url
            options["allow_http"] = endpoint_url.startswith("http://")
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            kwargs["region"] = "us-east-1"  # MinIO/SeaweedFS ignore it; signing needs one
        try:
            self._store = S3Store.from_url(
                url,
                client_options=options,  # type: ignore[arg-type]
                retry_config={
                    "max_retries": 2,
                    "retry_timeout": timedelta(seconds=timeout_s),
                    "backoff": {
                        "init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=2),
                        "base": 2,
                    },
                },
                **kwargs,
            )
        except Exception as exc:
            raise ConfigurationError(
                f"MEDBATCH_STORAGE_URL={url!r} cannot be used: {exc}. Set it to "
                "s3://bucket/prefix and MEDBATCH_S3_ENDPOINT_URL/AWS_* for the service."
            ) from exc

    def _failed(self, what: str, key: str, exc: Exception) -> StorageError:
        from obstore import exceptions as ox

        if isinstance(exc, FileNotFoundError | ox.NotFoundError):
            return StorageError(f"no object {key!r} in {self.url}")
        if isinstance(exc, PermissionError | ox.PermissionDeniedError | ox.UnauthenticatedError):
            return StorageError(
                f"{what} {key!r} in {self.url} was refused ({type(exc).__name__}); check the "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY medbatch runs with and the bucket policy"
            )
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return StorageUnavailableError(
            f"object storage {self.url} did not answer a {what} of {key!r} ({first}); check that "
            "the S3 service (MEDBATCH_S3_ENDPOINT_URL) is up"
        )

    def put(self, key: str, data: bytes | memoryview) -> None:
        import obstore

        try:
            obstore.put(self._store, _check_key(key), data, use_multipart=False)
        except Exception as exc:
            raise self._failed("write", key, exc) from exc

    def put_file(self, key: str, path: Path) -> None:
        import obstore

        try:
            obstore.put(self._store, _check_key(key), path)
        except Exception as exc:
            raise self._failed("write", key, exc) from exc

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return obstore.get(self._store, _check_key(key)).bytes().to_bytes()
        except Exception as exc:
            raise self._failed("read", key, exc) from exc

    def fetch(self, key: str, scratch_dir: Path) -> Path:
        """Streamed to the file in chunks (a multi-GB extract never sits in memory)."""
        import obstore

        target = scratch_dir / _check_key(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with target.open("wb") as fh:
                for chunk in obstore.get(self._store, key).stream(min_chunk_size=8 << 20):
                    fh.write(memoryview(chunk))
        except Exception as exc:
            target.unlink(missing_ok=True)
            raise self._failed("read", key, exc) from exc
        return target

    def exists(self, key: str) -> bool:
        import obstore
        from obstore import exceptions as ox

        try:
            obstore.head(self._store, _check_key(key))
        except (FileNotFoundError, ox.NotFoundError):
            return False
        except Exception as exc:
            raise self._failed("lookup", key, exc) from exc
        return True

    def keys(self, prefix: str) -> list[str]:
        import obstore

        try:
            found = [
                str(meta["path"])
                for batch in obstore.list(self._store, _check_key(prefix) + "/")
                for meta in batch
            ]
        except Exception as exc:
            raise self._failed("listing", prefix, exc) from exc
        return sorted(found)

    def delete(self, key: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, _check_key(key))
        except Exception as exc:
            raise self._failed("delete", key, exc) from exc

    def delete_prefix(self, prefix: str) -> None:
        import obstore

        found = self.keys(prefix)
        try:
            for start in range(0, len(found), 1000):
                obstore.delete(self._store, found[start : start + 1000])
        except Exception as exc:
            raise self._failed("delete", prefix, exc) from exc


_lock = threading.Lock()
_cache: dict[tuple[int, str, str, float, Path | None], Storage] = {}


def storage_for(settings: Settings) -> Storage:
    """The process's storage for these settings (a remote store's client is made per process,
    after a fork, never shared with a parent)."""
    url = settings.storage_url
    local_root = None if is_remote(url) else settings.objects_dir  # "" means storage_dir
    ident = (os.getpid(), url, settings.s3_endpoint_url, settings.s3_timeout_s, local_root)
    with _lock:
        found = _cache.get(ident)
        if found is None:
            found = _cache[ident] = (
                S3Storage(
                    url, endpoint_url=settings.s3_endpoint_url, timeout_s=settings.s3_timeout_s
                )
                if is_remote(url)
                else LocalStorage(settings.objects_dir)
            )
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_scratch(base: Path) -> int:
    """Remove the scratch folders of this host's processes that are gone (a task killed with
    SIGKILL leaves its folder behind); another host's folders, should ``base`` be shared, are
    left alone. Returns how many were removed."""
    prefix = f"{socket.gethostname()}-"
    removed = 0
    for entry in base.glob(f"{glob.escape(prefix)}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def scratch(settings: Settings) -> Iterator[Path]:
    """A private local folder for what one task writes and reads itself; removed afterwards.
    Named by host and process, so that the next task sweeps what a killed one left."""
    base = settings.storage_dir / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    sweep_scratch(base)
    path = Path(tempfile.mkdtemp(dir=base, prefix=f"{socket.gethostname()}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
