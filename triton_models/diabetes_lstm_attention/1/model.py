"""Triton python backend model ``diabetes_lstm_attention``: the probability of a diabetes
complication (``RISK``) from a patient's visit sequence, the attention weight of each visit
(``ATTENTION``) and each variable's contribution to the risk logit (``CONTRIBUTION``), from the
tensors of ``workers.ehr.features.stack_sequences`` (``VALUES``, ``OBSERVED``, ``DT_YEARS``,
``LENGTH``).

A reference model trained on synthetic EHR data only (see ../MODEL_CARD.md): it proves the
pipeline and must never be used for any decision about a patient.

One ``execute`` call may carry several requests (dynamic batching). Each request is validated on
its own; the valid ones are concatenated into one batch and scored with a single forward pass
(which includes the occlusion copies behind ``CONTRIBUTION``); the outputs are split back per
request. A malformed request (missing input, wrong shape or dtype, NaN/inf, ``LENGTH`` outside
[1, 20], values outside their physiological range) gets an error response without failing the
others.
"""

# The python backend stub ignores PYTHONPATH when it builds sys.path: add its entries (with .pth
# processing) before anything outside the standard library is imported.
import os
import site
import sys

for _p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _p and _p not in sys.path:
        site.addsitedir(_p)

import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from torch.utils.dlpack import to_dlpack  # noqa: E402

NAME = "diabetes_lstm_attention"
INPUT_NAMES = ("VALUES", "OBSERVED", "DT_YEARS", "LENGTH")
RISK_OUTPUT = "RISK"
ATTENTION_OUTPUT = "ATTENTION"
CONTRIBUTION_OUTPUT = "CONTRIBUTION"


def _load_network(version_dir: Path):
    spec = importlib.util.spec_from_file_location(f"{NAME}_network", version_dir / "network.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_torch(tensor) -> torch.Tensor:
    """A pb_utils input tensor as a CPU torch tensor.

    Goes through DLPack rather than ``as_numpy()``: with the Triton 2.51 python backend stub
    shipped in nvidia-pytriton and numpy 1.26, the arrays that ``as_numpy()`` returned read back
    wrong values (see molecule_gnn/1/model.py). Outputs are built with
    ``pb_utils.Tensor.from_dlpack`` for the same reason.
    """
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu()


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        params = self.model_config.get("parameters", {})
        threads = int(params.get("cpu_threads", {}).get("string_value", "1") or "1")
        torch.set_num_threads(max(1, threads))

        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.network = _load_network(version_dir)
        try:
            payload = torch.load(version_dir / "weights.pt", map_location="cpu", weights_only=True)
        except TypeError:  # torch without weights_only
            payload = torch.load(version_dir / "weights.pt", map_location="cpu")
        try:
            model = self.network.build_from_payload(payload)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{NAME}: {exc}") from exc

        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        self.model = model.to(self.device).eval()

    def _parse(self, request):
        """({name: tensor}, None) of one request, or (None, error message)."""
        try:
            inputs = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    return None, f"{NAME}: missing input tensor {name}"
                inputs[name] = _as_torch(tensor)
            problem = self.network.validate_inputs(inputs)
            if problem is not None:
                return None, f"{NAME}: malformed request: {problem}"
        except Exception as exc:  # anything unforeseen stays confined to this request
            return None, f"{NAME}: malformed request: {type(exc).__name__}: {exc}"
        return inputs, None

    def execute(self, requests):
        responses = [None] * len(requests)
        batches, owners = [], []
        for i, request in enumerate(requests):
            inputs, error = self._parse(request)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                batches.append(inputs)
                owners.append(i)

        if batches:
            try:
                joined = [torch.cat([b[n] for b in batches], dim=0) for n in INPUT_NAMES]
                pred = self.network.predict(self.model, *joined, self.device)
                start = 0
                for i, inputs in zip(owners, batches, strict=True):
                    b = int(inputs["VALUES"].shape[0])
                    part = slice(start, start + b)
                    outputs = [
                        (RISK_OUTPUT, pred.risk[part].reshape(b, 1)),
                        (ATTENTION_OUTPUT, pred.attention[part]),
                        (CONTRIBUTION_OUTPUT, pred.contribution[part]),
                    ]
                    tensors = [
                        pb_utils.Tensor.from_dlpack(n, to_dlpack(t.contiguous()))
                        for n, t in outputs
                    ]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += b
            except Exception as exc:
                message = f"{NAME}: inference failed: {type(exc).__name__}: {exc}"
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return responses

    def finalize(self):
        self.model = None
        self.network = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
