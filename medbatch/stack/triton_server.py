"""The real Triton Inference Server from the ``nvidia-pytriton`` wheel, serving ``triton_models/``.

The wheel ships ``tritonserver`` (2.51), the python backend and one backend stub per Python
version. Triton looks for the stub inside the backend directory, so we assemble one under the
storage directory with the stub built for *this* interpreter, and point the stub at this
interpreter's ``libpython`` and site-packages (where torch lives for the model side).

The stub runs Python in isolated mode: of this repository only the backend folder itself is on
its ``sys.path``. The models' shared adapter (``triton_torch_adapter``) is linked there, next to
``triton_python_backend_utils.py``, so that every ``model.py`` can import it first; the adapter
then adds the site-packages named in ``PYTHONPATH``. docker/triton.Dockerfile puts it in the same
place in the NGC image.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import ConfigurationError
from core.settings import Settings
from medbatch.stack.process import ManagedProcess

#: The package every ``triton_models/*/1/model.py`` imports (see the module docstring).
ADAPTER_PACKAGE = "triton_torch_adapter"


def pytriton_root() -> Path:
    """Where the nvidia-pytriton wheel lies (found, not imported: its package imports a lot)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the nvidia-pytriton wheel is not installed (pip install nvidia-pytriton)"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def backend_directory(state_dir: Path) -> Path:
    """Assemble ``<state>/triton/backends/python`` with the stub for this Python."""
    root = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigurationError(f"nvidia-pytriton has no python backend stub for Python {version}")
    target = state_dir / "triton" / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in [*sorted((root / "backends" / "python").glob("*.*")), stub]:
        if src.is_file():
            dst = target / src.name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copy2(src, dst)
    _link(target / ADAPTER_PACKAGE, adapter_package_dir())
    return target.parent


def adapter_package_dir() -> Path:
    """Where the models' adapter package lies (found, not imported)."""
    spec = importlib.util.find_spec(ADAPTER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            f"the {ADAPTER_PACKAGE} package is not installed (pip install -e . in the repository)"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _link(link: Path, target: Path) -> None:
    """``link`` → ``target`` as a symbolic link (a link to elsewhere is replaced: the storage
    directory may have served another checkout)."""
    if link.is_symlink() and link.resolve() == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    try:
        link.symlink_to(target, target_is_directory=True)
    except FileExistsError:  # another process linked it at the same moment
        if link.resolve() != target:
            raise


def server_env() -> dict[str, str]:
    """Environment for tritonserver and its stubs: this Python's libpython and site-packages."""
    env = dict(os.environ)
    libs = [
        sysconfig.get_config_var("LIBDIR") or "",
        str(pytriton_root().parent / "nvidia_pytriton.libs"),
        env.get("LD_LIBRARY_PATH", ""),
    ]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    paths = [*site.getsitepackages(), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def triton_argv(settings: Settings, state_dir: Path) -> list[str]:
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    repo = settings.triton_model_repository.resolve()
    if not repo.is_dir():
        raise ConfigurationError(f"Triton model repository {repo} does not exist")
    argv = [
        str(binary),
        f"--model-repository={repo}",
        f"--backend-directory={backend_directory(state_dir)}",
        f"--http-address={settings.triton_host}",
        f"--grpc-address={settings.triton_host}",
        f"--metrics-address={settings.triton_host}",
        f"--http-port={settings.triton_http_port}",
        f"--grpc-port={settings.triton_grpc_port}",
        f"--metrics-port={settings.triton_metrics_port}",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--log-verbose=0",
    ]
    if settings.triton_model_config_name:
        argv.append(f"--model-config-name={settings.triton_model_config_name}")
    return argv


def triton_process(settings: Settings, state_dir: Path) -> ManagedProcess:
    work = state_dir / "triton"
    return ManagedProcess(
        f"tritonserver:{settings.triton_grpc_port}",
        triton_argv(settings, state_dir),
        server_env(),
        work / f"tritonserver-{settings.triton_http_port}.log",
        # Not the caller's directory: the python backend stubs import from their working
        # directory, and a storage_dir there holds this very "triton" folder, which would
        # shadow the `triton` package torch looks for (seen as "module 'triton' has no
        # attribute 'language'" when `medbatch up` runs inside its storage_dir, as systemd does).
        cwd=work,
    )


def is_ready(settings: Settings, timeout: float = 1.0) -> bool:
    """Triton's own readiness: server live and every model loaded."""
    try:
        with urllib.request.urlopen(
            f"{settings.triton_http_url}/v2/health/ready", timeout=timeout
        ) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
