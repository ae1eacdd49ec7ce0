"""Triton python backend model ``lung_ct_cnn``: probability that a chest CT holds a nodule-like
lesion (``STUDY_PROB``) and a score per slice of the model grid (``SLICE_SCORES``), from the
[64, 128, 128] lung-windowed volume of ``workers/dicom/preprocess.py`` (``VOLUME``).

A reference model trained on synthetic CT only (see ../MODEL_CARD.md): it proves the pipeline
and must never be used for diagnosis.

One ``execute`` call may carry several requests (dynamic batching). Each request is validated on
its own; the valid ones are concatenated into one batch and scored with a single forward pass;
the outputs are split back per request. A malformed request (wrong shape or dtype, NaN/inf,
values outside [0, 1]) gets an error response without failing the others.
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

INPUT_NAME = "VOLUME"
STUDY_OUTPUT = "STUDY_PROB"
SLICE_OUTPUT = "SLICE_SCORES"


def _load_network(version_dir: Path):
    spec = importlib.util.spec_from_file_location("lung_ct_cnn_network", version_dir / "network.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_torch(tensor) -> torch.Tensor:
    """A pb_utils input tensor as a CPU torch tensor.

    Goes through DLPack rather than ``as_numpy()``: with the Triton 2.51 python backend stub
    shipped in nvidia-pytriton and numpy 1.26, the arrays that ``as_numpy()`` returned read back
    wrong values (see molecule_gnn/1/model.py). Outputs are built with
    ``pb_utils.Tensor.from_dlpack`` for the same reason (``pb_utils.Tensor(name, ndarray)``
    reached the client empty).
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
            raise pb_utils.TritonModelException(f"lung_ct_cnn: {exc}") from exc

        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        self.model = model.to(self.device).eval()

    def _parse(self, request):
        """(volumes [b, 64, 128, 128], None) of one request, or (None, error message)."""
        try:
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                return None, f"lung_ct_cnn: missing input tensor {INPUT_NAME}"
            volumes = _as_torch(tensor)
            problem = self.network.validate_volumes(volumes)
            if problem is not None:
                return None, f"lung_ct_cnn: malformed request: {problem}"
        except Exception as exc:  # anything unforeseen stays confined to this request
            return None, f"lung_ct_cnn: malformed request: {type(exc).__name__}: {exc}"
        return volumes, None

    def execute(self, requests):
        responses = [None] * len(requests)
        batches, owners = [], []
        for i, request in enumerate(requests):
            volumes, error = self._parse(request)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                batches.append(volumes)
                owners.append(i)

        if batches:
            try:
                pred = self.network.predict(self.model, torch.cat(batches, dim=0), self.device)
                start = 0
                for i, volumes in zip(owners, batches, strict=True):
                    b = int(volumes.shape[0])
                    study = pred.study_prob[start : start + b].reshape(b, 1).contiguous()
                    slices = pred.slice_scores[start : start + b].contiguous()
                    outputs = [
                        pb_utils.Tensor.from_dlpack(STUDY_OUTPUT, to_dlpack(study)),
                        pb_utils.Tensor.from_dlpack(SLICE_OUTPUT, to_dlpack(slices)),
                    ]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=outputs)
                    start += b
            except Exception as exc:
                message = f"lung_ct_cnn: inference failed: {type(exc).__name__}: {exc}"
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return responses

    def finalize(self):
        self.model = None
        self.network = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
