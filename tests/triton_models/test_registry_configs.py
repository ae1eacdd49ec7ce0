"""Every served model's registry entry and its Triton configuration name the same tensors."""

from __future__ import annotations

import re

import pytest

from core.served_models import BUILTIN, ServedModel
from core.settings import REPO_ROOT


@pytest.mark.parametrize("model", BUILTIN, ids=lambda m: m.name)
def test_inputs_and_outputs_are_in_both_configs(model: ServedModel) -> None:
    folder = REPO_ROOT / "triton_models" / model.name
    for config in (folder / "config.pbtxt", folder / "configs" / "gpu.pbtxt"):
        text = config.read_text()
        assert f'name: "{model.name}"' in text, config
        declared = set(re.findall(r'\{\s*name:\s*"([A-Z_]+)"', text))
        assert declared == set(model.inputs) | set(model.outputs), (config, declared)
