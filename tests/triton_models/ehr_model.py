"""What the EHR model tests (``test_diabetes_lstm_attention.py``, ``test_cvd_autoencoder.py``)
share: the module fixtures that load a model's network, committed weights, metrics and
reference patients (rebuilt through the real extract → reader → features path, as train.py
built them), the python-backend instance, and a few checks that read the same for both models.

The fixtures are made per model by :func:`fixtures`, which the test module unpacks into
its own names so pytest finds them there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medbatch.training.ehr import load_cohort
from tests.triton_models.python_backend import cpu_model, load_module
from triton_torch_adapter.model_files import load_weights

CPU = torch.device("cpu")
MODELS_DIR = Path(__file__).resolve().parents[2] / "triton_models"


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann–Whitney AUROC with tied scores at their average rank (as scikit-learn's)."""
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse]
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tensors(
    inputs: dict[str, np.ndarray], names: Sequence[str], sl: slice = slice(None)
) -> list[torch.Tensor]:
    """The inputs ``names`` (in that order), rows ``sl``, as contiguous tensors."""
    return [torch.from_numpy(np.ascontiguousarray(inputs[n][sl])) for n in names]


def fixtures(name: str) -> tuple[Any, ...]:
    """Module-scoped fixtures of model ``name``: ``network``, ``train_module``, ``payload``,
    ``model``, ``metrics``, ``reference`` ((cohort, inputs) of the reference test patients) and
    ``triton_model`` (its ``1/model.py`` as a one-thread CPU instance)."""
    model_dir = MODELS_DIR / name
    version_dir = model_dir / "1"

    @pytest.fixture(scope="module", name="network")
    def network() -> Any:
        return load_module(f"{name}_network_test", version_dir / "network.py")

    @pytest.fixture(scope="module", name="train_module")
    def train_module() -> Any:
        return load_module(f"{name}_train_test", model_dir / "train.py")

    @pytest.fixture(scope="module", name="payload")
    def payload() -> Any:
        return load_weights(version_dir)

    @pytest.fixture(scope="module", name="model")
    def model(network: Any, payload: Any) -> Any:
        return network.build_from_payload(payload)

    @pytest.fixture(scope="module", name="metrics")
    def metrics() -> Any:
        return json.loads((model_dir / "metrics.json").read_text())

    @pytest.fixture(scope="module", name="reference")
    def reference(
        train_module: Any, metrics: Any, tmp_path_factory: pytest.TempPathFactory
    ) -> tuple[Any, dict[str, np.ndarray]]:
        ref = metrics["reference"]
        workdir = tmp_path_factory.mktemp("ehr")
        cohort = load_cohort(ref["patients"], ref["generator_seed"], workdir, train_module.OUTCOME)
        return cohort, train_module.cohort_inputs(cohort)

    @pytest.fixture(scope="module", name="triton_model")
    def triton_model() -> Iterator[Any]:
        with cpu_model(model_dir, f"{name}_triton_model_test") as m:
            yield m

    return network, train_module, payload, model, metrics, reference, triton_model


def read_cpu_config(model_dir: Path) -> str:
    """``config.pbtxt``, checked for what every python-backend model here needs (CPU instances
    with a thread setting, dynamic batching, batches of 64) and for the GPU variant differing
    only in the instance kind."""
    config = (model_dir / "config.pbtxt").read_text()
    assert 'key: "cpu_threads"' in config and "KIND_CPU" in config
    assert 'backend: "python"' in config and "dynamic_batching" in config
    assert int(config.split("max_batch_size:")[1].split()[0]) >= 64
    gpu = (model_dir / "configs" / "gpu.pbtxt").read_text()
    assert gpu.replace("KIND_GPU", "KIND_CPU").split("name:", 1)[1] == config.split("name:", 1)[1]
    return config


def assert_same_outputs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], atol: float) -> None:
    """Two predictions (tuples of output tensors) agree output by output within ``atol``."""
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def assert_batching_invariant(
    network: Any, model: Any, inputs: dict[str, np.ndarray], names: Sequence[str]
) -> None:
    """Five patients scored together give what each gives alone."""
    together = network.predict(model, *tensors(inputs, names, slice(0, 5)), CPU)
    for i in range(5):
        alone = network.predict(model, *tensors(inputs, names, slice(i, i + 1)), CPU)
        assert_same_outputs([a[0] for a in alone], [b[i] for b in together], atol=1e-5)


def recorded_aurocs(metrics: dict[str, Any]) -> tuple[float, float, float]:
    """Test AUROC of the model, the baseline and the ceiling, as ``metrics.json`` records them."""
    t = metrics["test"]
    model, base, ceiling = (
        t[k]["auroc"]
        for k in ("model", "baseline_logistic_regression", "truth_probability_ceiling")
    )
    return model, base, ceiling


def rescore_reference(
    network: Any,
    model: Any,
    metrics: dict[str, Any],
    reference: tuple[Any, dict[str, np.ndarray]],
    names: Sequence[str],
) -> Any:
    """Score the reference patients with the committed weights, check the aggregate figures
    and patient ids ``metrics.json`` records, and return the prediction for the model's own
    checks."""
    cohort, inputs = reference
    ref = metrics["reference"]
    assert len(cohort.patient_ids) == ref["patients"]
    pred = network.predict(model, *tensors(inputs, names), CPU)
    risk = pred.risk.numpy().astype(np.float64)
    assert auroc(cohort.label, risk) == pytest.approx(ref["auroc"], abs=2e-6)
    assert risk.sum() == pytest.approx(ref["risk_sum"], abs=1e-2)
    assert cohort.patient_ids[: len(ref["first"])] == [f["patient_id"] for f in ref["first"]]
    return pred


def validation_checker(
    network: Any, inputs: dict[str, np.ndarray], names: Sequence[str]
) -> Callable[[str, Callable[[torch.Tensor], torch.Tensor]], str | None]:
    """``bad(name, edit)``: the message of ``network.validate_inputs`` for the first three
    reference patients (checked valid here) with input ``name`` edited on a copy."""
    ok = {n: torch.from_numpy(inputs[n][:3].copy()) for n in names}
    assert network.validate_inputs(ok) is None

    def bad(name: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
        changed = {n: t.clone() for n, t in ok.items()}
        changed[name] = edit(changed[name])
        message: str | None = network.validate_inputs(changed)
        return message

    return bad
