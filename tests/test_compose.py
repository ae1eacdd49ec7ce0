"""docker-compose.yml parses, names every service the code expects, and agrees with the code:
environment variables are real settings, worker queues are the configured queues, Triton
selects a GPU config that exists for every model and its image holds the models and the adapter
they import."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.settings import REPO_ROOT, Settings
from medbatch.stack.triton_server import ADAPTER_PACKAGE

COMPOSE = REPO_ROOT / "docker-compose.yml"
EXPECTED = {
    "postgres",
    "redis",
    "s3",
    "triton",
    "migrate",
    "worker-chem",
    "worker-dicom",
    "worker-ehr",
    "worker-maintenance",
    "listener",
    "beat",
    "api",
    "flower",
}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_expected_service_is_there_with_a_healthcheck() -> None:
    services = _compose()["services"]
    assert set(services) == EXPECTED
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"


def test_environment_names_real_settings() -> None:
    fields = set(Settings.model_fields)
    for name, svc in _compose()["services"].items():
        for key in svc.get("environment") or {}:
            if key.startswith("MEDBATCH_"):
                assert key.removeprefix("MEDBATCH_").lower() in fields, f"{name}: {key}"


def test_workers_consume_the_configured_queues() -> None:
    s = Settings()
    services = _compose()["services"]
    queues = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if cmd[:2] == ["medbatch", "worker"]:
            queues[name] = cmd[cmd.index("--queues") + 1]
            assert f"medbatch-{queues[name]}@$$HOSTNAME" in " ".join(svc["healthcheck"]["test"])
    assert set(queues.values()) == {s.queue_chem, s.queue_dicom, s.queue_ehr, s.queue_maintenance}


def test_the_api_serves_the_console_on_8080_and_is_checked_on_healthz() -> None:
    api = _compose()["services"]["api"]
    assert api["command"] == ["medbatch", "serve"]
    env = api["environment"]
    assert env["MEDBATCH_API_BIND_ADDRESS"] == "0.0.0.0" and env["MEDBATCH_API_PORT"] == "8080"
    assert env["MEDBATCH_DATABASE_URL"].startswith("postgresql")  # the shared settings too
    assert any(p.endswith(":8080") for p in api["ports"])
    assert "localhost:8080/healthz" in " ".join(api["healthcheck"]["test"])
    # uploads reach the workers through the object store, not a shared volume
    assert ":-s3://" in env["MEDBATCH_STORAGE_URL"]


def test_no_volume_is_shared_between_medbatch_services() -> None:
    """Listener, API and workers share only the object store, broker and database (any of
    them can run on another host); each keeps scratch in its own anonymous volume."""
    services = _compose()["services"]
    named: dict[str, list[str]] = {}
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if "MEDBATCH_DATABASE_URL" not in env or name == "migrate":
            continue
        assert ":-s3://" in env["MEDBATCH_STORAGE_URL"], name
        assert env["MEDBATCH_S3_ENDPOINT_URL"] == "${MEDBATCH_S3_ENDPOINT_URL:-http://s3:8333}"
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if ":" in volume else None
            if source and not source.startswith(("/", ".", "$")):  # a named volume
                named.setdefault(source, []).append(name)
    assert named == {}, f"named volumes shared by medbatch services: {named}"
    assert "s3" in services and "s3-data:/data" in services["s3"]["volumes"]
    assert "/srv/ehr-drop" in " ".join(services["worker-maintenance"]["volumes"])


def test_triton_reserves_a_gpu_and_every_model_has_a_gpu_config() -> None:
    triton = _compose()["services"]["triton"]
    assert "--model-config-name=gpu" in triton["command"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    models = [p.parent for p in (REPO_ROOT / "triton_models").glob("*/config.pbtxt")]
    assert models, "no Triton models"
    for model in models:
        gpu = model / "configs" / "gpu.pbtxt"
        assert gpu.is_file(), f"{model.name} lacks configs/gpu.pbtxt"
        assert "KIND_GPU" in gpu.read_text()
        assert "KIND_CPU" in (model / "config.pbtxt").read_text()


def test_dockerfiles_exist_for_built_services() -> None:
    for name, svc in _compose()["services"].items():
        build = svc.get("build")
        if build:
            assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file(), name
    assert Path(REPO_ROOT / "docker" / "triton.Dockerfile").read_text().count("tritonserver:24.10")


def test_triton_image_holds_the_models_and_the_adapter_they_import() -> None:
    """The NGC python backend stub, like the local one, has its own folder on ``sys.path`` and
    nothing of this repository: the adapter every model.py imports must be copied there."""
    dockerfile = (REPO_ROOT / "docker" / "triton.Dockerfile").read_text()
    copies = dict(line.split()[1:3] for line in dockerfile.splitlines() if line.startswith("COPY "))
    command = _compose()["services"]["triton"]["command"]
    assert f"--model-repository={copies['triton_models']}" in command
    backend = "/opt/tritonserver/backends/python"
    assert copies[ADAPTER_PACKAGE] == f"{backend}/{ADAPTER_PACKAGE}"
    assert (REPO_ROOT / ADAPTER_PACKAGE / "__init__.py").is_file()
    models = sorted((REPO_ROOT / "triton_models").glob("*/1/model.py"))
    assert len(models) == len(list((REPO_ROOT / "triton_models").glob("*/config.pbtxt")))
    for model in models:
        assert f"from {ADAPTER_PACKAGE}.serving import" in model.read_text(), model
