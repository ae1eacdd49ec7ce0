"""The ``lung_ct_cnn`` Triton model: constants shared with the preprocessing, the committed
weights against their recorded metrics, network shapes and ranges, behaviour on fresh synthetic
volumes, the python-backend ``execute`` path (with a stand-in for
``triton_python_backend_utils``) and, with the real server, a concurrent batch over gRPC."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from medbatch.synth.lung_ct import synth_volume
from tests.triton_models.python_backend import (
    Request,
    cpu_model,
    load_module,
)
from triton_torch_adapter.model_files import load_weights, state_dict_sha256
from workers.dicom import preprocess

MODEL_DIR = Path(__file__).resolve().parents[2] / "triton_models" / "lung_ct_cnn"
VERSION_DIR = MODEL_DIR / "1"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def network():
    return load_module("lung_ct_cnn_network_test", VERSION_DIR / "network.py")


@pytest.fixture(scope="module")
def train_module():
    return load_module("lung_ct_cnn_train_test", MODEL_DIR / "train.py")


@pytest.fixture(scope="module")
def payload():
    return load_weights(VERSION_DIR)


@pytest.fixture(scope="module")
def model(network, payload):
    return network.build_from_payload(payload)


@pytest.fixture(scope="module")
def metrics():
    return json.loads((MODEL_DIR / "metrics.json").read_text())


@pytest.fixture(scope="module")
def fresh_volumes():
    """Four positive and four negative volumes from seeds no split of train.py uses."""
    out = []
    for k in range(8):
        ct = synth_volume(9_000_000 + k, 48 + 8 * k, nodules=2 if k % 2 == 0 else 0)
        out.append((ct, preprocess.model_input(ct.hu)))
    return out


def test_constants_match_preprocessing(network):
    assert network.GRID == preprocess.GRID
    assert network.WINDOW == (preprocess.WINDOW_CENTER_HU, preprocess.WINDOW_WIDTH_HU)


def test_weights_payload_hash_and_size(network, payload, metrics):
    assert tuple(payload["grid"]) == network.GRID
    assert payload["synthetic_data_only"] is True
    sha = state_dict_sha256(payload["state_dict"])
    assert sha == payload["state_dict_sha256"] == metrics["state_dict_sha256"]
    assert (VERSION_DIR / "weights.pt").stat().st_size < 5 * 1024 * 1024


def test_build_rejects_other_grid(network, payload):
    bad = {**payload, "grid": [32, 64, 64]}
    with pytest.raises(ValueError, match="retrain"):
        network.build_from_payload(bad)


def test_recorded_metrics_beat_the_baseline(metrics):
    test = metrics["test"]
    assert test["study"]["auroc"] > metrics["baseline"]["study"]["auroc"] + 0.1
    assert test["slice"]["auroc"] > metrics["baseline"]["slice"]["auroc"]
    assert test["study"]["auroc"] > 0.7 and test["slice"]["auroc"] > 0.8
    assert metrics["cpu_seconds_per_study_1_thread_informational"] < 0.5


def test_neighbour_stack(network):
    v = torch.arange(2 * 4 * 1 * 1, dtype=torch.float32).reshape(2, 4, 1, 1)
    x = network.neighbour_stack(v)
    assert x.shape == (8, 3, 1, 1)
    assert x[0, :, 0, 0].tolist() == [0, 0, 1]  # first slice repeats itself below
    assert x[1, :, 0, 0].tolist() == [0, 1, 2]
    assert x[3, :, 0, 0].tolist() == [2, 3, 3]
    assert x[4, :, 0, 0].tolist() == [4, 4, 5]  # second volume starts over


def test_forward_shapes_and_ranges(network, model):
    volumes = torch.rand(2, *network.GRID, generator=torch.Generator().manual_seed(0))
    pred = network.predict(model, volumes, CPU)
    assert pred.study_prob.shape == (2,) and pred.slice_scores.shape == (2, 64)
    assert pred.attention.shape == (2, 64) and pred.slice_logits.shape == (2, 64)
    for t in (pred.study_prob, pred.slice_scores, pred.attention):
        assert t.dtype == torch.float32
        assert bool(((t >= 0) & (t <= 1)).all())
    torch.testing.assert_close(pred.attention.sum(dim=1), torch.ones(2), atol=1e-5, rtol=0)


def test_batching_invariance(network, model, fresh_volumes):
    volumes = torch.from_numpy(np.stack([g for _, g in fresh_volumes[:3]]))
    together = network.predict(model, volumes, CPU)
    for i in range(3):
        alone = network.predict(model, volumes[i : i + 1], CPU)
        torch.testing.assert_close(alone.study_prob[0], together.study_prob[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            alone.slice_scores[0], together.slice_scores[i], atol=1e-5, rtol=0
        )


def test_fresh_positives_score_higher(network, model, fresh_volumes, train_module):
    volumes = torch.from_numpy(np.stack([g for _, g in fresh_volumes]))
    pred = network.predict(model, volumes, CPU)
    labels = np.array([ct.label for ct, _ in fresh_volumes])
    assert labels.tolist() == [1, 0] * 4
    study = pred.study_prob.numpy()
    assert study[labels == 1].mean() > study[labels == 0].mean() + 0.1
    # on the positives, the lesion slices score higher than the rest
    scores = pred.slice_scores.numpy()
    on, off = [], []
    for (ct, _), s in zip(fresh_volumes, scores, strict=True):
        if ct.label:
            lab = train_module.grid_slice_labels(ct.nodule_slices, ct.hu.shape[0])
            on.append(s[lab].max())
            off.append(s[~lab].mean())
    assert np.mean(on) > np.mean(off)


def test_committed_weights_reproduce_reference_predictions(network, model, metrics):
    for ref in metrics["reference_predictions"][:3]:
        ct = synth_volume(ref["seed"], ref["n_slices"])
        assert ct.label == ref["label"]
        grid = torch.from_numpy(preprocess.model_input(ct.hu))[None]
        pred = network.predict(model, grid, CPU)
        assert float(pred.study_prob[0]) == pytest.approx(ref["study_prob"], abs=1e-4)
        assert float(pred.slice_scores[0].sum()) == pytest.approx(ref["slice_scores_sum"], abs=1e-3)


def test_grid_slice_labels(train_module):
    labels = train_module.grid_slice_labels
    assert not labels(frozenset(), 100).any()
    same = labels(frozenset({10, 11}), 64)
    assert np.flatnonzero(same).tolist() == [10, 11]
    # 127 source slices: grid slice g sits on source slice 2g and covers 2g-1 .. 2g+1
    assert np.flatnonzero(labels(frozenset({21}), 127)).tolist() == [10, 11]
    assert np.flatnonzero(labels(frozenset({20}), 127)).tolist() == [10]
    # 32 source slices: each lands on the two nearest grid slices around it
    up = np.flatnonzero(labels(frozenset({16}), 32)).tolist()
    assert up and all(abs(g * 31 / 63 - 16) <= 0.5 for g in up)
    assert labels(frozenset({0}), 1).all()


def test_lesion_cells_cover_the_lesion(train_module):
    ct = synth_volume(7, 80, nodules=1)
    lab = train_module.grid_slice_labels(ct.nodule_slices, 80)
    cells = train_module.lesion_cells(ct, lab)
    assert cells.shape == (64, 16, 16)
    assert np.array_equal(cells.any(axis=(1, 2)), lab)
    (lesion,) = ct.lesions
    _, rows, cols = ct.hu.shape
    r = (lesion.center_mm[1] / ct.spacing_mm[1] + (rows - 1) / 2) * 127 / (rows - 1)
    c = (lesion.center_mm[2] / ct.spacing_mm[2] + (cols - 1) / 2) * 127 / (cols - 1)
    assert cells[:, int(r // 8), int(c // 8)].any()


# ------------------------------------------------------------------ python backend execute()
@pytest.fixture(scope="module")
def triton_model():
    config = (MODEL_DIR / "config.pbtxt").read_text()
    assert 'key: "cpu_threads"' in config and "KIND_CPU" in config
    gpu = (MODEL_DIR / "configs" / "gpu.pbtxt").read_text()
    assert gpu.replace("KIND_GPU", "KIND_CPU").split("name:", 1)[1] == config.split("name:", 1)[1]
    with cpu_model(MODEL_DIR, "lung_ct_cnn_triton_model_test") as model:
        yield model


def test_execute_batches_requests_and_isolates_errors(network, model, triton_model, fresh_volumes):
    grids = np.stack([g for _, g in fresh_volumes[:3]])
    one, two = grids[:1], grids[1:3]
    nan = grids[:1].copy()
    nan[0, 5, 60, 60] = np.nan
    hu_sent = grids[:1] * 1500 - 1350  # forgot the lung window
    wrong_shape = np.zeros((1, 32, 128, 128), np.float32)
    requests = [
        {"VOLUME": one},
        {"VOLUME": nan},
        {"VOLUME": two},
        {"VOLUME": hu_sent.astype(np.float32)},
        {"VOLUME": wrong_shape},
        {},
    ]
    responses = triton_model.execute([Request(r) for r in requests])
    assert len(responses) == len(requests)
    expected = network.predict(model, torch.from_numpy(grids), CPU)
    for i, sl in ((0, slice(0, 1)), (2, slice(1, 3))):
        assert responses[i].error is None
        study, slices = responses[i].output_tensors
        assert study.name() == "STUDY_PROB" and slices.name() == "SLICE_SCORES"
        b = sl.stop - sl.start
        assert study.as_numpy().shape == (b, 1) and slices.as_numpy().shape == (b, 64)
        assert study.as_numpy().dtype == np.float32
        np.testing.assert_allclose(
            study.as_numpy()[:, 0], expected.study_prob[sl].numpy(), atol=1e-5
        )
        np.testing.assert_allclose(slices.as_numpy(), expected.slice_scores[sl].numpy(), atol=1e-5)
    messages = {i: responses[i].error.message() for i in (1, 3, 4, 5)}
    assert "NaN" in messages[1]
    assert "[0, 1]" in messages[3] and "model_input" in messages[3]
    assert "shape" in messages[4]
    assert "missing input tensor VOLUME" in messages[5]
    assert all(m.startswith("lung_ct_cnn:") for m in messages.values())


# ------------------------------------------------------------------------- real Triton server
@pytest.mark.server
def test_triton_serves_concurrent_batch(stack, network, model, fresh_volumes):
    import tritonclient.grpc as grpcclient

    url = stack.settings.triton_grpc_url
    client = grpcclient.InferenceServerClient(url)
    assert client.is_model_ready("lung_ct_cnn")
    grids = np.stack([g for _, g in fresh_volumes[:3]])
    chunks = [grids[:1], grids[1:3]]

    def infer(chunk):
        c = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("VOLUME", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("STUDY_PROB", "SLICE_SCORES")]
        result = c.infer("lung_ct_cnn", [inp], outputs=outputs, client_timeout=120)
        return result.as_numpy("STUDY_PROB"), result.as_numpy("SLICE_SCORES")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(infer, chunks))
    expected = network.predict(model, torch.from_numpy(grids), CPU)
    study = np.concatenate([r[0] for r in results])
    slices = np.concatenate([r[1] for r in results])
    assert study.shape == (3, 1) and slices.shape == (3, 64)
    np.testing.assert_allclose(study[:, 0], expected.study_prob.numpy(), atol=1e-4)
    np.testing.assert_allclose(slices, expected.slice_scores.numpy(), atol=1e-4)
