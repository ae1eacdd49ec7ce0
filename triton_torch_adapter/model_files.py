"""A Triton model version directory's own files, read the same way by Triton's model.py, the
training scripts, the tests and the benchmarks: ``network.py`` (imported by path: a model
directory is not a package, and inside Triton nothing of this repository but this package is
on ``sys.path``), ``weights.pt`` (the payload ``train.py`` writes) and the SHA-256 of a state
dict that ``metrics.json`` and ``weights.pt`` record."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

NETWORK_FILE = "network.py"
WEIGHTS_FILE = "weights.pt"


def load_module(path: Path, name: str) -> ModuleType:
    """Import the file ``path`` as module ``name``. The module is registered in ``sys.modules``
    (as an ordinary import is) so that dataclasses and pickling can find it."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_network(version_dir: Path) -> ModuleType:
    """``<version_dir>/network.py`` as module ``<model>_network`` (the model directory's name)."""
    version_dir = Path(version_dir)
    return load_module(version_dir / NETWORK_FILE, f"{version_dir.absolute().parent.name}_network")


def load_weights(version_dir: Path) -> dict[str, Any]:
    """The payload of ``<version_dir>/weights.pt`` on the CPU, read with ``weights_only``
    (tensors and plain containers only: no code runs while it is read)."""
    path = Path(version_dir) / WEIGHTS_FILE
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch without weights_only
        payload = torch.load(path, map_location="cpu")
    return payload


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors of a state dict."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
