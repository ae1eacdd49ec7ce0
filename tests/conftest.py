"""Shared fixtures: real databases (SQLite and PostgreSQL) and a real stack (a private
redis-server, the Triton server from the nvidia-pytriton wheel, Celery worker processes) on free
loopback ports, started once per session and stopped at the end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from core.settings import Settings, get_settings
from db.migrate import upgrade
from db.session import dispose_all
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.process import free_port
from medbatch.stack.s3_server import S3Server
from medbatch.stack.worker_process import use_settings

PG_URL = os.environ.get(
    "MEDBATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TEST_AES = "MEDBATCH_TEST"
RDKIT_NCI = Path(__import__("rdkit").__file__).parent / "Data" / "NCI" / "first_5K.smi"


def _pg_admin_dsn() -> str:
    return make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def _postgres_available() -> str | None:
    try:
        with psycopg.connect(_pg_admin_dsn(), connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server; missing in CI is a failure, elsewhere a visible skip."""
    problem = _postgres_available()
    if problem:
        message = f"PostgreSQL at {PG_URL} is not reachable ({problem})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must test the database layer on PostgreSQL")
        pytest.skip(message + "; set MEDBATCH_TEST_POSTGRES_URL to run these tests")
    return PG_URL


def _fresh_pg_database(server_url: str) -> tuple[str, str]:
    name = f"medbatch_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False), name


def _drop_pg_database(name: str) -> None:
    dispose_all()
    with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'medbatch.db'}"
        upgrade(url)
        yield url
        dispose_all()
        return
    server = request.getfixturevalue("postgres_server")
    url, name = _fresh_pg_database(server)
    try:
        upgrade(url)
        yield url
    finally:
        _drop_pg_database(name)


def make_settings(tmp: Path, **overrides: object) -> Settings:
    """Settings for a private stack: free ports, fast retries, short redelivery for fault tests."""
    values: dict[str, object] = {
        "storage_dir": tmp,
        "database_url": f"sqlite:///{tmp / 'medbatch.db'}",
        "broker_url": f"redis://127.0.0.1:{free_port()}/0",
        "triton_http_port": free_port(),
        "triton_grpc_port": free_port(),
        "triton_metrics_port": free_port(),
        "triton_timeout_s": 60.0,
        "triton_retry_base_s": 0.5,
        "triton_retry_max_s": 2.0,
        "triton_max_retries": 40,
        "visibility_timeout_s": 20,
        "unacked_restore_interval_s": 2,
        "sweep_grace_s": 3.0,
        "sweep_interval_s": 5.0,
        "chem_chunk_size": 16,
        "worker_concurrency": 1,
        "metrics_port": free_port(),
        "api_port": free_port(),
        "dicom_port": free_port(),
        "dicom_allowed_aes": f"{TEST_AES}, STORESCU, ECHOSCU, PYNETDICOM",
        "dicom_quiet_period_s": 3.0,
        "dicom_completion_poll_s": 0.5,
        "dicom_destination": f"RECEIVER@127.0.0.1:{free_port()}",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def private_stack(settings: Settings, **kw: object) -> Iterator[EmbeddedStack]:
    """A stack for ``settings``; the process-wide settings are restored afterwards."""
    from workers.celery_app import app, reconfigure

    saved = dict(os.environ)
    use_settings(settings)
    try:
        with EmbeddedStack(settings, ready_timeout_s=240, **kw) as running:  # type: ignore[arg-type]
            yield running
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        reconfigure(app, get_settings())


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """Real Redis + Triton + one Celery worker + the DICOM listener, for the whole session."""
    settings = make_settings(tmp_path_factory.mktemp("stack"))
    with private_stack(settings, workers=1, beat=False, listener=True) as running:
        yield running


@pytest.fixture(scope="session")
def nci_smiles() -> list[tuple[str, str]]:
    """Real molecules: the NCI set that RDKit ships, as (SMILES, id)."""
    rows = []
    for line in RDKIT_NCI.read_text().splitlines():
        smi, nci_id = line.split("\t")[:2]
        rows.append((smi, nci_id))
    return rows


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS's S3 gateway on free loopback ports, its credentials in the environment while
    it runs (the workers and listeners started by a test inherit them)."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    with pytest.MonkeyPatch.context() as env:
        for key, value in server.env().items():
            env.setenv(key, value)
        with server:
            yield server
