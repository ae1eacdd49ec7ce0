"""Run a Triton python-backend ``model.py`` in the test process, without the server.

The real server tests cover transport; these stand-ins for ``triton_python_backend_utils``
let the tests drive ``execute()`` directly with crafted (also malformed) requests. Tensors go
through DLPack both ways, as the models do against the real stub.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from triton_torch_adapter import model_files

#: The adapter module that imports ``triton_python_backend_utils``; re-imported under the stand-in.
SERVING = "triton_torch_adapter.serving"


def load_module(name: str, path: Path) -> types.ModuleType:
    """Import ``path`` as module ``name`` (registered, so dataclasses and pickling work)."""
    return model_files.load_module(path, name)


class Tensor:
    """Stand-in for ``pb_utils.Tensor``."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.ascontiguousarray(array)

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> Tensor:
        return cls(name, torch.utils.dlpack.from_dlpack(capsule).numpy().copy())

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self._array))

    def is_cpu(self) -> bool:
        return True


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class Response:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


class Request:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.inputs = {n: Tensor(n, a) for n, a in arrays.items()}


def pb_utils() -> types.ModuleType:
    """A stand-in ``triton_python_backend_utils`` module."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = Tensor  # type: ignore[attr-defined]
    fake.TritonError = TritonError  # type: ignore[attr-defined]
    fake.InferenceResponse = Response  # type: ignore[attr-defined]
    fake.TritonModelException = RuntimeError  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    return fake


@contextmanager
def stand_in_backend() -> Iterator[None]:
    """``triton_python_backend_utils`` is the stand-in while the context lasts (and the adapter,
    which imports it, is imported afresh against it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton_python_backend_utils", pb_utils())
        mp.delitem(sys.modules, SERVING, raising=False)
        yield
        mp.delitem(sys.modules, SERVING, raising=False)


def initialize_args(model_dir: Path, kind: str = "CPU") -> dict[str, str]:
    """What Triton passes to ``initialize`` for instance 0 of version 1 (``cpu_threads`` 1)."""
    return {
        "model_name": model_dir.name,
        "model_config": json.dumps({"parameters": {"cpu_threads": {"string_value": "1"}}}),
        "model_repository": str(model_dir),
        "model_version": "1",
        "model_instance_kind": kind,
        "model_instance_device_id": "0",
    }


@contextmanager
def cpu_model(model_dir: Path, module_name: str) -> Iterator[Any]:
    """``model_dir``/1/model.py initialised as a one-thread CPU instance; finalised after."""
    threads = torch.get_num_threads()
    with stand_in_backend():
        module = load_module(module_name, model_dir / "1" / "model.py")
        model = module.TritonPythonModel()
        model.initialize(initialize_args(model_dir))
        try:
            yield model
        finally:
            model.finalize()
            torch.set_num_threads(threads)
