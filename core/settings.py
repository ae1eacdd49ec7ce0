"""All configuration in one place, read from ``MEDBATCH_*`` environment variables (or a ``.env``).

Defaults are for one machine (the embedded stack of ``medbatch up``): a private Redis on its own
loopback port, the Triton binary from the ``nvidia-pytriton`` wheel on loopback, SQLite in WAL mode
under ``storage_dir``. Production overrides the URLs (see ``docker-compose.yml``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.served_models import LUNG_CT_CNN, MOLECULE_GNN

#: The repository's Triton model repository, when running from a checkout or an editable install.
REPO_ROOT = Path(__file__).resolve().parents[1]


def local_host(bind_address: str) -> str:
    """Where a client on this machine reaches a server bound to ``bind_address`` (a wildcard
    bind answers on loopback)."""
    return "127.0.0.1" if bind_address in ("0.0.0.0", "", "::") else bind_address


class Settings(BaseSettings):
    """medbatch settings; every field is ``MEDBATCH_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="MEDBATCH_", env_file=".env", extra="ignore", validate_default=True
    )

    # --- where things live -------------------------------------------------------------------
    storage_dir: Path = Field(Path("var"), description="Database, logs and server state.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite in storage_dir.")
    storage_url: str = Field(
        "",
        description="Where everything medbatch keeps (received instances, extracts, EHR buckets, "
        "results) lives: a local directory, or s3://bucket/prefix for an S3-compatible store "
        "shared by several hosts (credentials: the standard AWS_* variables). Empty: storage_dir.",
    )
    s3_endpoint_url: str = Field(
        "", description="The S3 service for an s3:// storage_url (MinIO, SeaweedFS); empty: AWS."
    )
    s3_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one object store request before it counts as down."
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6389/0",
        description="Celery broker; `medbatch up` starts a private redis-server if none answers.",
    )

    # --- Triton --------------------------------------------------------------------------------
    triton_host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_model_repository: Path = REPO_ROOT / "triton_models"
    triton_model_config_name: str = Field(
        "", description="Select <model>/configs/<name>.pbtxt (e.g. 'gpu'); empty: config.pbtxt."
    )
    triton_timeout_s: float = Field(120.0, gt=0, description="Deadline of one inference call.")
    triton_retry_base_s: float = Field(
        5.0, gt=0, description="First back-off while Triton is down."
    )
    triton_retry_max_s: float = Field(300.0, gt=0, description="Longest single back-off.")
    triton_max_retries: int = Field(12, ge=0, description="Retries before a job is failed.")

    # --- queues and workers --------------------------------------------------------------------
    queue_chem: str = "chem"
    queue_dicom: str = "dicom"
    queue_ehr: str = "ehr"
    queue_maintenance: str = "maintenance"
    worker_concurrency: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Task slots per worker process (Celery's prefork children); default the "
        "cores: an EHR ingest and scoring batches, or two batches, then use every core.",
    )
    visibility_timeout_s: int = Field(
        3600,
        ge=5,
        description="Redis redelivers an unacknowledged task after this; > longest task.",
    )
    unacked_restore_interval_s: int = Field(
        30, ge=1, description="How often a worker looks for expired unacknowledged tasks."
    )
    max_deliveries: int = Field(
        5, ge=1, description="Deliveries of one job that end without a result before it fails."
    )
    task_time_limit_s: int = Field(1800, ge=1, description="Hard limit of one task.")
    sweep_interval_s: float = Field(60.0, gt=0, description="How often beat re-enqueues lost jobs.")
    sweep_grace_s: float = Field(
        120.0, gt=0, description="Age before an open job absent from the broker is re-published."
    )

    # --- compound screening --------------------------------------------------------------------
    chem_chunk_size: int = Field(512, ge=1, le=1024, description="Molecules per Triton request.")
    chem_ingest_batch: int = Field(2048, ge=1, description="Rows canonicalised per DB round trip.")
    chem_canonicalize_processes: int = Field(
        1,
        ge=1,
        le=256,
        description="Processes a library submission canonicalises in (RDKit parse, canonical "
        "SMILES, InChIKey: ~0.45 ms of CPU per molecule). 1 = in the submitting process; raise "
        "it to the cores a large submission may use.",
    )
    chem_model_name: str = Field(
        MOLECULE_GNN.name, description="The served model libraries are screened with."
    )
    chem_model_version: str = "1"

    # --- PACS push (DICOM) ---------------------------------------------------------------------
    dicom_ae_title: str = Field("MEDBATCH", min_length=1, max_length=16)
    dicom_bind_address: str = Field("127.0.0.1", description="Listener address; 0.0.0.0 for all.")
    dicom_port: int = Field(11112, ge=0, le=65535)
    dicom_allowed_aes: str = Field(
        "",
        description="Comma-separated calling AE titles allowed to connect, each optionally "
        "restricted to an address or network: 'CT1, PACS@10.0.0.5, MODALITY@10.1.0.0/16'.",
    )
    dicom_allow_any_ae: bool = Field(
        False, description="Accept every calling AE (only for a closed test network)."
    )
    dicom_max_associations: int = Field(16, ge=1, description="Per listener process.")
    dicom_max_pdu: int = Field(131072, ge=0, description="Largest PDU we receive; 0: unlimited.")
    dicom_listener_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Listener processes sharing the port (SO_REUSEPORT): one process serves its "
        "associations on about one core; raise it to the cores receiving may use.",
    )
    dicom_quiet_period_s: float = Field(
        30.0, gt=0, description="A study is complete after this long without a new instance."
    )
    dicom_completion_poll_s: float = Field(1.0, gt=0)
    dicom_tls_cert: Path | None = Field(None, description="PEM certificate: turns TLS on.")
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = Field(None, description="PEM CA bundle: clients must present one.")
    dicom_destination: str = Field(
        "", description="Where results are C-STORE'd: 'AE@host:port'; empty: not sent."
    )
    dicomweb_destination: str = Field(
        "",
        description="A DICOMweb service root results are sent to by STOW-RS (instead of "
        "C-STORE to MEDBATCH_DICOM_DESTINATION), e.g. https://pacs/dicom-web.",
    )
    dicomweb_destination_token: str = Field("", description="Bearer token for it, if any.")
    dicomweb_destination_user: str = Field("", description="Basic-auth user for it, if any.")
    dicomweb_destination_password: str = ""
    dicom_model_name: str = Field(
        LUNG_CT_CNN.name, description="The served model received studies are scored with."
    )
    dicom_model_version: str = "1"
    dicom_min_slices: int = Field(16, ge=2, description="Fewer axial CT slices: not applicable.")

    # --- nightly EHR extracts -----------------------------------------------------------------
    ehr_drop_dir: Path | None = Field(
        None, description="Folder the warehouse drops extracts into; unset: no scheduled scan."
    )
    ehr_drop_cron: str = Field(
        "*/5 * * * *", description="When beat scans the drop folder (5-field cron, UTC)."
    )
    ehr_drop_settle_s: float = Field(
        30.0, ge=0, description="A dropped file is taken once unchanged this long (still copying)."
    )
    ehr_block_bytes: int = Field(
        1 << 20,
        ge=1 << 16,
        description="CSV bytes parsed per block. pyarrow reads a few dozen blocks ahead, so the "
        "ingest's memory is about 50 × this (measured), whatever the file's size.",
    )
    ehr_bucket_bytes: int = Field(
        8 << 20,
        ge=1 << 10,
        description="Extract bytes per scoring batch: patients are hashed into "
        "file size / this buckets, each scored by one task.",
    )
    ehr_max_buckets: int = Field(512, ge=1, le=2048, description="Open spill files at most.")
    ehr_release_grouped: bool = Field(
        True,
        description="While an extract arrives grouped by patient, score complete patients in "
        "early buckets as the ingest goes on (checked as it reads; ingest/ehr/release.py).",
    )
    ehr_triton_batch: int = Field(256, ge=1, le=256, description="Patients per Triton request.")
    ehr_diabetes_model_version: str = "1"
    ehr_cvd_model_version: str = "1"
    extra_models: str = Field(
        "",
        description="Comma-separated modules whose MODELS list registers served models beside "
        "the built-in ones (core/model_registry.py): a site's own EHR model, say.",
    )

    # --- the HTTP API and console ----------------------------------------------------------------
    api_bind_address: str = Field("127.0.0.1", description="`medbatch serve` address.")
    api_port: int = Field(8080, ge=0, le=65535, description="`medbatch serve` port.")
    api_tls_cert: Path | None = Field(None, description="PEM certificate: the API speaks HTTPS.")
    api_tls_key: Path | None = None
    api_max_upload_bytes: int = Field(
        4 << 30, ge=1 << 10, description="Largest library or extract accepted by upload (413)."
    )
    api_forwarded_allow_ips: str = Field(
        "",
        description="Reverse proxies trusted for X-Forwarded-For/-Proto (comma-separated IPs; "
        "'*' for any). Empty: none, the peer address is the client.",
    )
    api_root_path: str = Field("", description="Path prefix when served behind a proxy, '/mb'.")

    # --- supervision by `medbatch up` -----------------------------------------------------------
    supervise_backoff_base_s: float = Field(
        1.0,
        gt=0,
        description="Delay before restarting a process `medbatch up` started that exited; "
        "doubled for each restart of it within the window.",
    )
    supervise_backoff_max_s: float = Field(60.0, gt=0, description="Longest restart delay.")
    supervise_restart_budget: int = Field(
        5,
        ge=0,
        description="Restarts of one process within the window; one more exit and `medbatch up` "
        "stops everything and exits non-zero (for systemd or another outer supervisor).",
    )
    supervise_restart_window_s: float = Field(
        600.0, gt=0, description="The window the restart budget and the back-off count over."
    )
    supervise_poll_s: float = Field(0.5, gt=0, description="How often processes are checked.")
    supervise_probe_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often a part `medbatch up` did not start (a Redis, Triton or API that "
        "answered already) is probed.",
    )

    metrics_host: str = Field("127.0.0.1", description="Bind address of the workers' /metrics.")
    metrics_port: int = Field(0, ge=0, description="Prometheus port of a worker; 0 turns it off.")

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        """Default the database to SQLite inside storage_dir; refuse a storage URL that is
        neither a directory nor s3:// (a typo must not become a folder named 'gs:')."""
        if "://" in self.storage_url and not self.storage_url.startswith(("s3://", "file://")):
            raise ValueError(
                f"MEDBATCH_STORAGE_URL={self.storage_url!r}: use a local directory, file:///path "
                "or s3://bucket/prefix (any S3-compatible store, with MEDBATCH_S3_ENDPOINT_URL)"
            )
        if self.storage_is_remote and len(self.storage_url.rstrip("/")) <= len("s3://"):
            raise ValueError("MEDBATCH_STORAGE_URL=s3:// needs a bucket: s3://bucket/prefix")
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.storage_dir / 'medbatch.db').resolve()}"
        return self

    @property
    def api_url(self) -> str:
        """Where `medbatch serve` answers (for people and for the console's links)."""
        scheme = "https" if self.api_tls_cert else "http"
        return f"{scheme}://{local_host(self.api_bind_address)}:{self.api_port}{self.api_root_path}"

    @property
    def storage_is_remote(self) -> bool:
        """Objects live in an S3 bucket shared by hosts, not in a local directory."""
        return self.storage_url.startswith("s3://")

    @property
    def objects_dir(self) -> Path:
        """The local directory of the objects (core/storage.py) when storage is local:
        MEDBATCH_STORAGE_URL's, else storage_dir. With S3 storage, local scratch only."""
        if self.storage_url and not self.storage_is_remote:
            return Path(self.storage_url.removeprefix("file://"))
        return self.storage_dir

    @property
    def upload_dir(self) -> Path:
        """Uploaded libraries and extracts, one folder per content hash (storage key
        ``uploads/<sha256>/<name>``)."""
        return self.objects_dir / "uploads"

    @property
    def dicom_storage_dir(self) -> Path:
        """Root of the received instances (key ``dicom/<study>/<series>/<instance>.dcm``)."""
        return self.objects_dir / "dicom"

    @property
    def ehr_spool_dir(self) -> Path:
        """Where an ingest spills each extract's patients, one file per bucket (key
        ``ehr/extract-<id>/bucket-<n>.arrow``; with S3 storage the local spill is scratch)."""
        return self.objects_dir / "ehr"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.triton_host}:{self.triton_grpc_port}"

    @property
    def triton_http_url(self) -> str:
        return f"http://{self.triton_host}:{self.triton_http_port}"

    @property
    def longest_backoff_total_s(self) -> float:
        """Upper bound of the time a job spends waiting for Triton before it is failed."""
        total, delay = 0.0, self.triton_retry_base_s
        for _ in range(self.triton_max_retries):
            total += min(delay, self.triton_retry_max_s)
            delay *= 2
        return total


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see exactly these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        key = f"MEDBATCH_{name.upper()}"
        if value is None:  # unset optional setting: must not become the text "None"
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests clear the cache after changing the environment)."""
    return Settings()
