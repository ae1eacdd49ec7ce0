"""Triton python backend model ``molecule_gnn``: aqueous solubility (logS) of molecules sent as
the padded categorical arrays of ``workers/chem/featurize.py``.

One ``execute`` call may carry several requests with different padded sizes (dynamic batching
with ``allow_ragged_batch``). Each request is validated and flattened on its own; the valid ones
are concatenated into one graph batch and scored with a single forward pass; the outputs are
split back per request. A malformed request gets an error response without failing the others.
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

INPUT_NAMES = ("ATOM_FEATS", "N_ATOMS", "BOND_INDEX", "BOND_FEATS", "N_BONDS")
OUTPUT_NAME = "LOGS"


def _load_network(version_dir: Path):
    spec = importlib.util.spec_from_file_location(
        "molecule_gnn_network", version_dir / "network.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_torch(tensor) -> torch.Tensor:
    """A pb_utils input tensor as a CPU torch tensor.

    Goes through DLPack rather than ``as_numpy()``: with the Triton 2.51 python backend stub
    shipped in nvidia-pytriton and numpy 1.26 (likely a numpy ABI mismatch), the arrays that
    ``as_numpy()`` returned read back wrong values (every element equal to the first). DLPack is
    also zero-copy and works for GPU-resident inputs. Outputs are built with
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
            model = self.network.build_for_serving(payload)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"molecule_gnn: {exc}") from exc

        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.mean = float(payload["target_mean"])
        self.std = float(payload["target_std"])

    def _parse(self, request):
        """(graph, batch size) of one request, or an error message."""
        arrays = {}
        try:
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    return None, f"molecule_gnn: missing input tensor {name}"
                arrays[name] = _as_torch(tensor)
            problem = self.network.validate_padded(*(arrays[n] for n in INPUT_NAMES))
            if problem is not None:
                return None, f"molecule_gnn: malformed request: {problem}"
            x, edge_index, edge_attr, batch = self.network.padded_to_batch(
                *(arrays[n] for n in INPUT_NAMES)
            )
        except Exception as exc:  # anything unforeseen stays confined to this request
            return None, f"molecule_gnn: malformed request: {type(exc).__name__}: {exc}"
        b = int(arrays["ATOM_FEATS"].shape[0])
        return (x, edge_index, edge_attr, batch, b), None

    def execute(self, requests):
        responses = [None] * len(requests)
        graphs, owners = [], []
        for i, request in enumerate(requests):
            graph, error = self._parse(request)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                graphs.append(graph)
                owners.append(i)

        if graphs:
            try:
                logs = self.network.predict_logs(
                    self.model,
                    self.network.concat_graphs(graphs),
                    self.device,
                    self.mean,
                    self.std,
                )
                start = 0
                for i, graph in zip(owners, graphs, strict=True):
                    b = graph[4]
                    part = logs[start : start + b].reshape(b, 1).contiguous()
                    out = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, to_dlpack(part))
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                    start += b
            except Exception as exc:
                message = f"molecule_gnn: inference failed: {type(exc).__name__}: {exc}"
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return responses

    def finalize(self):
        self.model = None
        self.network = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
