"""Run a Triton python-backend ``model.py`` in the test process, without the server.

The real server tests cover transport; these stand-ins for ``triton_python_backend_utils``
let the tests drive ``execute()`` directly with crafted (also malformed) requests. Tensors go
through DLPack both ways, as the models do against the real stub.
"""

from __future__ import annotations

import importlib.util
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


def load_module(name: str, path: Path) -> types.ModuleType:
    """Import ``path`` as module ``name`` (registered, so dataclasses and pickling work)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


@contextmanager
def cpu_model(model_dir: Path, module_name: str) -> Iterator[Any]:
    """``model_dir``/1/model.py initialised as a one-thread CPU instance; finalised after."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = Tensor  # type: ignore[attr-defined]
    fake.TritonError = TritonError  # type: ignore[attr-defined]
    fake.InferenceResponse = Response  # type: ignore[attr-defined]
    fake.TritonModelException = RuntimeError  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton_python_backend_utils", fake)
        module = load_module(module_name, model_dir / "1" / "model.py")
        model = module.TritonPythonModel()
        model.initialize(
            {
                "model_config": json.dumps({"parameters": {"cpu_threads": {"string_value": "1"}}}),
                "model_repository": str(model_dir),
                "model_version": "1",
                "model_instance_kind": "CPU",
                "model_instance_device_id": "0",
            }
        )
        try:
            yield model
        finally:
            model.finalize()
            torch.set_num_threads(threads)
