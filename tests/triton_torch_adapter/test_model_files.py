"""``triton_torch_adapter.model_files``: a version directory's network.py loaded by path under
its model's name, and the state-dict hash that metrics.json and weights.pt record."""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from triton_torch_adapter.model_files import load_network, load_weights, state_dict_sha256

MODELS = Path(__file__).resolve().parents[2] / "triton_models"


def test_load_network_imports_by_path_under_the_model_name(tmp_path):
    version = tmp_path / "some_model" / "1"
    version.mkdir(parents=True)
    (version / "network.py").write_text("ANSWER = 42\n")
    module = load_network(version)
    assert module.ANSWER == 42
    assert module.__name__ == "some_model_network"
    assert sys.modules["some_model_network"] is module


def test_state_dict_hash_covers_names_dtypes_shapes_and_bytes():
    base = OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.zeros(3))
    sha = state_dict_sha256(base)
    assert sha == state_dict_sha256(OrderedDict(reversed(list(base.items()))))  # order-free
    variants = [
        {"w": base["w"], "bias": base["b"]},
        {"w": base["w"].double(), "b": base["b"]},
        {"w": base["w"].reshape(3, 2), "b": base["b"]},
        {"w": base["w"] + 1, "b": base["b"]},
    ]
    assert len({sha, *(state_dict_sha256(v) for v in variants)}) == 5


def test_every_committed_model_loads_and_matches_its_recorded_hash():
    versions = sorted(MODELS.glob("*/1"))
    with_weights = [v for v in versions if (v / "weights.pt").is_file()]
    for version in set(versions) - set(with_weights):  # serves another model's weights
        declared = re.search(r'weights_from = "(\w+)"', (version / "model.py").read_text())
        assert declared, f"{version}: no weights.pt and no weights_from"
        assert MODELS / declared.group(1) / "1" in with_weights, version
    for version in with_weights:
        network = load_network(version)
        payload = load_weights(version)
        assert hasattr(network, "build_from_payload"), version
        assert state_dict_sha256(payload["state_dict"]) == payload["state_dict_sha256"], version
