"""The ``cvd_autoencoder`` Triton model: constants shared with the EHR schema, the committed
weights against their recorded metrics (re-scoring the reference test patients through the real
extract → reader → features path), the out-of-distribution flag, occlusion contributions, the
python-backend ``execute`` path (with a stand-in for ``triton_python_backend_utils``) and, with
the real server, concurrent requests over gRPC."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import pytest
import torch

from ingest.ehr.schema import VARIABLES, model_schema
from tests.triton_models import ehr_model
from tests.triton_models.ehr_model import CPU
from tests.triton_models.python_backend import Request
from triton_torch_adapter.model_files import state_dict_sha256

NAME = "cvd_autoencoder"
MODEL_DIR = ehr_model.MODELS_DIR / NAME
VERSION_DIR = MODEL_DIR / "1"
INPUTS = ("VALUES", "OBSERVED")
OUTPUTS = ("RISK", "RECON_ERROR", "OOD", "CONTRIBUTION")
COLUMN = {name: j for j, name in enumerate(model_schema(NAME).variables)}


network, train_module, payload, model, metrics, reference, triton_model = ehr_model.fixtures(NAME)


def tensors(inputs: dict[str, np.ndarray], sl: slice = slice(None)) -> list[torch.Tensor]:
    return ehr_model.tensors(inputs, INPUTS, sl)


def profile(**values: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fully observed profile: typical values, overridden by ``values``."""
    typical = {
        "age": 55,
        "sex": 0,
        "sbp": 128,
        "dbp": 78,
        "bmi": 27,
        "total_cholesterol": 5.2,
        "hdl": 1.4,
        "ldl": 3.2,
        "smoker": 0,
        "hba1c": 5.5,
    }
    typical.update(values)
    row = [float(typical[v]) for v in model_schema(NAME).variables]
    return torch.tensor([row]), torch.ones(1, len(row))


# ------------------------------------------------------------------------------ model and weights
def test_constants_match_schema(network):
    schema = model_schema(NAME)
    assert schema.variables == network.VARIABLES
    limits = tuple((VARIABLES[v].low, VARIABLES[v].high) for v in schema.variables)
    assert limits == network.LIMITS
    flags = tuple(VARIABLES[v].flag for v in schema.variables)
    assert flags == network.FLAGS


def test_config_matches_network():
    config = ehr_model.read_cpu_config(MODEL_DIR)
    for line in (
        'name: "VALUES" data_type: TYPE_FP32 dims: [ 10 ]',
        'name: "OBSERVED" data_type: TYPE_FP32 dims: [ 10 ]',
        'name: "RISK" data_type: TYPE_FP32 dims: [ 1 ]',
        'name: "RECON_ERROR" data_type: TYPE_FP32 dims: [ 1 ]',
        'name: "OOD" data_type: TYPE_BOOL dims: [ 1 ]',
        'name: "CONTRIBUTION" data_type: TYPE_FP32 dims: [ 10 ]',
    ):
        assert line in config


def test_weights_payload_hash_size_and_threshold(network, model, payload, metrics):
    assert payload["synthetic_data_only"] is True and metrics["synthetic_data_only"] is True
    sha = state_dict_sha256(payload["state_dict"])
    assert sha == payload["state_dict_sha256"] == metrics["state_dict_sha256"]
    assert (VERSION_DIR / "weights.pt").stat().st_size < 1024 * 1024
    # the OOD threshold travels in the state dict and is the one reported
    threshold = metrics["ood"]["threshold"]
    assert float(model.ood_threshold) == pytest.approx(threshold, rel=1e-7)
    assert payload["ood_threshold"] == threshold
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    assert f"{threshold:.4f}" in card
    assert "SYNTHETIC" in card and "NEVER" in card


def test_build_rejects_other_variables(network, payload):
    with pytest.raises(ValueError, match="retrain"):
        network.build_from_payload({**payload, "variables": list(network.VARIABLES)[::-1]})


def test_recorded_metrics(metrics):
    t = metrics["test"]
    model, base, ceiling = ehr_model.recorded_aurocs(metrics)
    assert model > 0.78
    assert model > base - 0.005  # logistic regression is a strong baseline on this mechanism
    assert model < ceiling + 0.005
    assert t["model"]["ece_10_bins"] < 0.03
    ood = metrics["ood"]
    assert ood["percentile"] == 99.5
    assert 0.002 < ood["test_rate"] < 0.012


def test_committed_weights_reproduce_reference_patients(network, model, metrics, reference):
    pred = ehr_model.rescore_reference(network, model, metrics, reference, INPUTS)
    ref = metrics["reference"]
    assert float(pred.recon_error.double().sum()) == pytest.approx(ref["recon_error_sum"], abs=1e-2)
    assert int(pred.ood.sum()) == ref["ood_count"]
    for i, first in enumerate(ref["first"]):
        assert float(pred.risk[i]) == pytest.approx(first["risk"], abs=1e-5)
        assert float(pred.recon_error[i]) == pytest.approx(first["recon_error"], abs=1e-5)
        assert bool(pred.ood[i]) == first["ood"]
        np.testing.assert_allclose(pred.contribution[i].numpy(), first["contribution"], atol=1e-4)


# ----------------------------------------------------------------------------------- behaviour
def test_ood_flags_implausible_profiles_not_typical_patients(
    network, model, train_module, reference
):
    for name, values in train_module.IMPLAUSIBLE_PROFILES.items():
        x = torch.tensor([values], dtype=torch.float32)
        obs = torch.ones_like(x)
        assert network.validate_inputs({"VALUES": x, "OBSERVED": obs}) is None, name
        pred = network.predict(model, x, obs, CPU)
        assert bool(pred.ood[0]), name
        assert float(pred.recon_error[0]) > 10 * float(model.ood_threshold), name
    # a plain, typical profile is not flagged
    typical = network.predict(model, *profile(), CPU)
    assert not bool(typical.ood[0])
    assert float(typical.recon_error[0]) < float(model.ood_threshold) / 2
    # held-out patients: the flag rate is close to the chosen percentile (0.5 %)
    _, inputs = reference
    pred = network.predict(model, *tensors(inputs), CPU)
    assert 0.001 <= float(pred.ood.float().mean()) <= 0.015
    assert bool((pred.ood == (pred.recon_error > model.ood_threshold)).all())


def test_unobserved_values_are_ignored(network, model, reference):
    _, inputs = reference
    values, observed = tensors(inputs, slice(0, 300))
    assert bool((observed == 0).any())  # some patients lack lipids
    clean = network.predict(model, values, observed, CPU)
    garbage = torch.where(observed == 1, values, torch.full_like(values, 1e4))
    dirty = network.predict(model, garbage, observed, CPU)
    ehr_model.assert_same_outputs(clean, dirty, atol=1e-6)


def test_batching_invariance(network, model, reference):
    ehr_model.assert_batching_invariant(network, model, reference[1], INPUTS)


def test_contributions_are_occlusion_effects(network, model, reference):
    _, inputs = reference
    values, observed = tensors(inputs, slice(0, 50))
    pred = network.predict(model, values, observed, CPU)
    assert pred.contribution.shape == (50, 10) and pred.contribution.dtype == torch.float32
    for j in (COLUMN["age"], COLUMN["smoker"]):
        v, o = values.clone(), observed.clone()
        v[:, j] = 0
        o[:, j] = 0
        with torch.inference_mode():
            logit, _, _ = model(v, o)
        torch.testing.assert_close(pred.contribution[:, j], pred.logit - logit, atol=1e-5, rtol=0)
    never = observed == 0
    assert bool(never.any()) and bool((pred.contribution[never] == 0).all())


def test_contributions_name_the_risk_factor(network, model):
    young_smoker = network.predict(model, *profile(age=42, smoker=1), CPU)
    assert int(young_smoker.contribution[0].argmax()) == COLUMN["smoker"]
    old = network.predict(model, *profile(age=78), CPU)
    assert int(old.contribution[0].argmax()) == COLUMN["age"]
    assert float(old.risk[0]) > float(network.predict(model, *profile(), CPU).risk[0])


def test_validate_inputs_messages(network, reference):
    _, inputs = reference
    bad = ehr_model.validation_checker(network, inputs, INPUTS)

    def mg_dl(t):  # total cholesterol sent in mg/dL
        t[0, COLUMN["total_cholesterol"]] = 201.0
        return t

    def half_male(t):
        t[2, COLUMN["sex"]] = 0.5
        return t

    def nothing(t):
        t[1] = 0
        return t

    assert "total_cholesterol 201" in bad("VALUES", mg_dl)
    assert "flag" in bad("VALUES", half_male)
    assert "OBSERVED[1] is all 0" in bad("OBSERVED", nothing)
    assert "float32" in bad("VALUES", lambda t: t.double())
    assert "shape" in bad("OBSERVED", lambda t: t[:, :9])
    assert "batch size" in bad("OBSERVED", lambda t: t[:2])
    assert "NaN" in bad("VALUES", lambda t: t / 0 * 0)


# ------------------------------------------------------------------ python backend execute()
def test_execute_batches_requests_and_isolates_errors(network, model, triton_model, reference):
    _, inputs = reference
    one = {n: inputs[n][:1] for n in INPUTS}
    three = {n: inputs[n][1:4] for n in INPUTS}
    absurd_values = np.array([[25, 0, 240, 60, 16, 3.0, 4.5, 6.0, 1, 14]], np.float32)
    absurd = {"VALUES": absurd_values, "OBSERVED": np.ones((1, 10), np.float32)}
    empty = {"VALUES": one["VALUES"], "OBSERVED": np.zeros((1, 10), np.float32)}
    inf = {**one, "VALUES": np.full((1, 10), np.inf, np.float32)}
    missing = {"VALUES": one["VALUES"]}
    requests = [one, empty, three, inf, absurd, missing]
    responses = triton_model.execute([Request(r) for r in requests])
    assert len(responses) == len(requests)
    all_values = np.concatenate([inputs["VALUES"][:4], absurd_values])
    all_observed = np.concatenate([inputs["OBSERVED"][:4], np.ones((1, 10), np.float32)])
    expected = network.predict(
        model, torch.from_numpy(all_values), torch.from_numpy(all_observed), CPU
    )
    for i, sl in ((0, slice(0, 1)), (2, slice(1, 4)), (4, slice(4, 5))):
        assert responses[i].error is None
        outs = responses[i].output_tensors
        assert [t.name() for t in outs] == list(OUTPUTS)
        risk, recon, ood, contribution = (t.as_numpy() for t in outs)
        b = sl.stop - sl.start
        assert risk.shape == recon.shape == ood.shape == (b, 1) and contribution.shape == (b, 10)
        assert risk.dtype == recon.dtype == np.float32 and ood.dtype == np.bool_
        np.testing.assert_allclose(risk[:, 0], expected.risk[sl].numpy(), atol=1e-5)
        np.testing.assert_allclose(recon[:, 0], expected.recon_error[sl].numpy(), atol=1e-5)
        np.testing.assert_array_equal(ood[:, 0], expected.ood[sl].numpy())
        np.testing.assert_allclose(contribution, expected.contribution[sl].numpy(), atol=1e-5)
    assert bool(responses[4].output_tensors[2].as_numpy()[0, 0])  # the absurd profile
    messages = {i: responses[i].error.message() for i in (1, 3, 5)}
    assert "all 0" in messages[1]
    assert "NaN or infinite" in messages[3]
    assert "missing input tensor OBSERVED" in messages[5]
    assert all(m.startswith(f"{NAME}:") for m in messages.values())


# ------------------------------------------------------------------------- real Triton server
@pytest.mark.server
def test_triton_serves_concurrent_requests(stack, network, model, train_module, reference):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = stack.settings.triton_grpc_url
    assert grpcclient.InferenceServerClient(url).is_model_ready(NAME)
    _, inputs = reference
    absurd = np.array(list(train_module.IMPLAUSIBLE_PROFILES.values()), np.float32)
    values = np.concatenate([absurd, inputs["VALUES"][:98]])
    observed = np.concatenate([np.ones_like(absurd), inputs["OBSERVED"][:98]])
    bounds = [0, 1, 8, 24, 64, 100]
    chunks = [(values[a:b], observed[a:b]) for a, b in pairwise(bounds)]
    broken = (values[:1], np.zeros((1, 10), np.float32))

    def infer(chunk):
        c = grpcclient.InferenceServerClient(url)
        ins = []
        for n, array in zip(INPUTS, chunk, strict=True):
            inp = grpcclient.InferInput(n, list(array.shape), "FP32")
            inp.set_data_from_numpy(np.ascontiguousarray(array))
            ins.append(inp)
        outs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
        try:
            r = c.infer(NAME, ins, outputs=outs, client_timeout=120)
        except InferenceServerException as exc:
            return str(exc)
        return tuple(r.as_numpy(n) for n in OUTPUTS)

    with ThreadPoolExecutor(len(chunks) + 1) as pool:
        results = list(pool.map(infer, [*chunks, broken]))
    *good, error = results
    assert isinstance(error, str) and "all 0" in error
    expected = network.predict(model, torch.from_numpy(values), torch.from_numpy(observed), CPU)
    risk, recon, ood, contribution = (
        np.concatenate([r[k] for r in good]) for k in range(len(OUTPUTS))
    )
    assert risk.shape == (100, 1) and ood.dtype == np.bool_
    np.testing.assert_allclose(risk[:, 0], expected.risk.numpy(), atol=1e-4)
    np.testing.assert_allclose(recon[:, 0], expected.recon_error.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ood[:, 0], expected.ood.numpy())
    assert ood[: len(absurd), 0].all()
    np.testing.assert_allclose(contribution, expected.contribution.numpy(), atol=1e-3)
