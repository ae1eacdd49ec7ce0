"""``triton_torch_adapter.serving`` with a toy model, driven through the stand-in for
``triton_python_backend_utils``: one forward pass per ``execute``, outputs split back per
request, a malformed request refused on its own, a failed forward pass failing only its batch,
and what ``initialize`` takes from Triton's arguments. (Every real model's own ``execute`` test
is in tests/triton_models/; the real server loads them all in the server tests.)"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tests.triton_models.python_backend import Request, initialize_args, stand_in_backend

#: A network.py that follows the adapter's conventions: ``X`` [B, 3] float32 scaled by the
#: weights, ``W`` [B, 1] added (``Y``), and the row sums of ``X`` (``TOTAL``, [B]). Validation
#: raises on X[0, 0] == -1 (an unforeseen error); scoring fails on a value 999.
NETWORK = """
from typing import NamedTuple

import torch


class Prediction(NamedTuple):
    y: torch.Tensor
    total: torch.Tensor


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(factor))

    def forward(self, x):
        return x * self.factor


def build_from_payload(payload):
    if payload["columns"] != 3:
        raise ValueError("weights.pt was trained on other columns; retrain")
    return Scale(payload["factor"])


def validate_inputs(inputs):
    x, w = inputs["X"], inputs["W"]
    if x.dim() != 2 or x.shape[1] != 3 or tuple(w.shape) != (x.shape[0], 1):
        return f"X must be [B, 3] and W [B, 1], got {list(x.shape)}, {list(w.shape)}"
    if float(x[0, 0]) == -1:
        raise RuntimeError("unforeseen")
    if not bool(torch.isfinite(x).all()):
        return "X contains NaN"
    return None


def predict(model, x, w, device):
    if bool((x == 999).any()):
        raise ValueError("boom")
    with torch.inference_mode():
        return Prediction(model(x.to(device)).cpu() + w, x.sum(1))
"""


@pytest.fixture
def serving() -> Iterator[ModuleType]:
    with stand_in_backend():
        yield importlib.import_module("triton_torch_adapter.serving")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    version = tmp_path / "toy" / "1"
    version.mkdir(parents=True)
    (version / "network.py").write_text(NETWORK)
    torch.save({"columns": 3, "factor": 2.0}, version / "weights.pt")
    return version.parent


def toy_class(serving: ModuleType) -> type:
    class Toy(serving.BatchedTorchModel):  # type: ignore[name-defined,misc]
        """The toy network with the adapter's defaults; the batches it scored in ``calls``."""

        inputs = ("X", "W")
        outputs = ("Y", "TOTAL")
        calls: list[int]

        def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            self.calls.append(int(batch["X"].shape[0]))
            outputs: dict[str, torch.Tensor] = super().predict(batch)
            return outputs

    return Toy


@pytest.fixture
def toy(serving: ModuleType, model_dir: Path) -> Iterator[Any]:
    threads = torch.get_num_threads()
    model = toy_class(serving)()
    model.calls = []
    model.initialize(initialize_args(model_dir))
    yield model
    model.finalize()
    torch.set_num_threads(threads)


def request(rows: int, start: float = 0.0, **edit: Any) -> Request:
    x = np.arange(start, start + 3 * rows, dtype=np.float32).reshape(rows, 3)
    w = np.full((rows, 1), 0.5, np.float32)
    arrays = {"X": x, "W": w}
    for name, value in edit.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return Request(arrays)


def test_valid_requests_share_one_forward_pass_and_errors_stay_with_their_request(toy):
    nan = np.zeros((2, 3), np.float32)
    nan[1, 2] = np.nan
    requests = [
        request(2),
        request(1, W=None),
        request(2, X=nan),
        request(1, start=10),
        request(1, X=np.full((1, 3), -1, np.float32)),
        request(1, X=np.zeros((1, 4), np.float32)),
        request(3, start=20),
    ]
    responses = toy.execute(requests)

    assert toy.calls == [6]  # rows 2 + 1 + 3, one pass
    assert len(responses) == len(requests)
    for i in (0, 3, 6):
        assert responses[i].error is None
        y, total = responses[i].output_tensors
        assert (y.name(), total.name()) == ("Y", "TOTAL")
        x = requests[i].inputs["X"].as_numpy()
        np.testing.assert_array_equal(y.as_numpy(), x * 2 + 0.5)
        np.testing.assert_array_equal(total.as_numpy(), x.sum(1, keepdims=True))  # [B] → [B, 1]
        assert y.as_numpy().dtype == np.float32
    messages = {i: responses[i].error.message() for i in (1, 2, 4, 5)}
    assert messages[1] == "toy: missing input tensor W"
    assert messages[2] == "toy: malformed request: X contains NaN"
    assert messages[4] == "toy: malformed request: RuntimeError: unforeseen"
    assert messages[5].startswith("toy: malformed request: X must be [B, 3]")


def test_a_failed_forward_pass_fails_its_batch_and_no_more(toy):
    poisoned = np.full((1, 3), 999, np.float32)
    responses = toy.execute([request(1, W=None), request(2), request(1, X=poisoned)])
    assert toy.calls == [3]
    assert responses[0].error.message() == "toy: missing input tensor W"
    for r in responses[1:]:
        assert r.error.message() == "toy: inference failed: ValueError: boom"
        assert r.output_tensors == []
    # the next batch is served again
    (ok,) = toy.execute([request(1)])
    assert ok.error is None


def test_an_output_without_a_row_per_input_row_is_an_inference_failure(toy):
    toy.predict = lambda batch: {"Y": batch["X"][:1], "TOTAL": batch["X"].sum(1)}
    responses = toy.execute([request(2), request(1)])
    for r in responses:
        assert r.error.message() == "toy: inference failed: ValueError: output Y has 1 rows, not 3"


def test_a_batch_of_malformed_requests_runs_no_forward_pass(toy):
    responses = toy.execute([request(1, X=None), request(1, W=None)])
    assert toy.calls == []
    assert [r.error.message() for r in responses] == [
        "toy: missing input tensor X",
        "toy: missing input tensor W",
    ]


def test_initialize_takes_threads_device_and_weights_from_triton(serving, model_dir):
    threads = torch.get_num_threads()
    try:
        model = toy_class(serving)()
        args = initialize_args(model_dir)
        args["model_config"] = '{"parameters": {"cpu_threads": {"string_value": "2"}}}'
        model.initialize(args)
        assert torch.get_num_threads() == 2
        assert model.device == torch.device("cpu")
        assert model.model.factor.item() == 2.0 and not model.model.training
        assert model.network.__name__ == "toy_network"
        model.finalize()
        assert model.model is None
    finally:
        torch.set_num_threads(threads)
    assert serving.cpu_threads({}) == 1
    assert serving.cpu_threads({"parameters": {"cpu_threads": {"string_value": ""}}}) == 1
    gpu = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert serving.instance_device(gpu) == torch.device("cuda:1")
    assert serving.instance_device({"model_instance_kind": "CPU"}) == torch.device("cpu")


def test_weights_the_network_refuses_stop_the_model_load(serving, model_dir):
    torch.save({"columns": 4, "factor": 2.0}, model_dir / "1" / "weights.pt")
    with pytest.raises(RuntimeError, match=r"^toy: weights.pt was trained on other columns"):
        toy_class(serving)().initialize(initialize_args(model_dir))


def test_import_adds_the_site_directories_the_isolated_stub_ignores(tmp_path):
    """Triton's stub runs Python isolated (PYTHONPATH ignored); importing the adapter adds the
    PYTHONPATH entries as site directories, .pth files included, before it imports torch."""
    site_dir, extra = tmp_path / "site", tmp_path / "extra"
    site_dir.mkdir()
    extra.mkdir()
    (site_dir / "extra.pth").write_text(f"{extra}\n")
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "triton_python_backend_utils.py").write_text("")
    code = (
        "import sys; sys.path.append(sys.argv[1]); "
        "import triton_torch_adapter.serving; "
        "print(sys.argv[2] in sys.path, sys.argv[3] in sys.path, sys.flags.isolated)"
    )
    env = {**os.environ, "PYTHONPATH": str(site_dir)}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path / "backend"), str(site_dir), str(extra)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.split() == ["True", "True", "1"]
