"""The base of every ``TritonPythonModel`` in ``triton_models/``: a torch network served by
Triton's python backend, with dynamic batching.

A model's ``1/model.py`` subclasses :class:`BatchedTorchModel` and gives only what is its own:
its input names (:attr:`~BatchedTorchModel.inputs`) and output names
(:attr:`~BatchedTorchModel.outputs`), and wherever its ``network.py`` does not follow the
conventions below, how it checks one request (:meth:`~BatchedTorchModel.validate`), builds the
network from the ``weights.pt`` payload (:meth:`~BatchedTorchModel.build`) and scores a batch
(:meth:`~BatchedTorchModel.predict`; :meth:`~BatchedTorchModel.prepare` and
:meth:`~BatchedTorchModel.join` where a request is more than tensors to concatenate).

The conventions of ``network.py`` (the defaults): ``build_from_payload(payload)`` returns the
module; ``validate_inputs({name: tensor})`` returns why a request is malformed, or ``None``;
``predict(model, *inputs, device)`` takes the inputs in the order of ``inputs`` and returns a
named tuple with a field per output, named as the output in lower case (``RISK``: ``risk``).

What this class does for all of them:

* ``initialize``: ``torch.set_num_threads`` from the config parameter ``cpu_threads``; the
  device from the instance kind (``KIND_GPU`` → ``cuda:<device id>``, else the CPU);
  ``network.py`` loaded by path and the ``weights.pt`` payload read; a payload the network
  refuses (``ValueError``) stops the model load with the reason.
* ``execute``: each request is read (inputs through DLPack) and validated on its own; a
  malformed one (missing input, the model's own checks, anything unforeseen while reading it)
  gets an error response without failing the others. The valid ones are joined into one batch
  and scored with a single forward pass; the outputs are split back per request by rows. If the
  forward pass fails, every request of that batch gets the error.
* ``finalize``: drops the model (and the CUDA cache on a GPU).

Error messages start with the model's name, so that a worker's log says which model refused.
"""

# The python backend stub builds sys.path in isolated mode: it ignores PYTHONPATH, where
# medbatch's stack (medbatch/stack/triton_server.py) names the site-packages that hold torch.
# Add those entries (with .pth processing) before anything outside the standard library is
# imported. Elsewhere (tests, the NGC image) they are already on sys.path or there are none.
import os
import site
import sys

for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry and _entry not in sys.path:
        site.addsitedir(_entry)

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.dlpack import from_dlpack, to_dlpack  # noqa: E402

from triton_torch_adapter.model_files import load_network, load_weights  # noqa: E402

# A model.py imports torch's names from here: anything it imported before this module would be
# looked for before the site-packages are in place.
__all__ = ["BatchedTorchModel", "Tensor", "as_output", "as_torch", "cpu_threads", "instance_device"]


def as_torch(tensor: Any) -> Tensor:
    """A ``pb_utils`` input tensor as a CPU torch tensor.

    Goes through DLPack rather than ``as_numpy()``: with the Triton 2.51 python backend stub
    shipped in nvidia-pytriton and numpy 1.26 (likely a numpy ABI mismatch), the arrays that
    ``as_numpy()`` returned read back wrong values (every element equal to the first). DLPack is
    also zero-copy and works for GPU-resident inputs. Outputs are built with
    ``pb_utils.Tensor.from_dlpack`` (:func:`as_output`) for the same reason
    (``pb_utils.Tensor(name, ndarray)`` reached the client empty).
    """
    return from_dlpack(tensor.to_dlpack()).cpu()


def as_output(name: str, tensor: Tensor) -> Any:
    """A torch tensor as the ``pb_utils`` output tensor ``name`` (through DLPack, see
    :func:`as_torch`)."""
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor.contiguous()))


def cpu_threads(model_config: dict[str, Any]) -> int:
    """The config parameter ``cpu_threads`` (at least 1; 1 when absent or empty)."""
    value = model_config.get("parameters", {}).get("cpu_threads", {}).get("string_value", "1")
    return max(1, int(value or "1"))


def instance_device(args: dict[str, Any]) -> torch.device:
    """Where this instance runs: ``cuda:<id>`` for a ``KIND_GPU`` instance, else the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return torch.device(f"cuda:{args['model_instance_device_id']}")
    return torch.device("cpu")


def error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class BatchedTorchModel:
    """A torch network behind Triton's python backend; subclass it as ``TritonPythonModel``."""

    #: The model's input tensor names; each request must carry all of them.
    inputs: tuple[str, ...] = ()
    #: The output tensor names, in the order of the response; the default :meth:`predict` fills
    #: each from the field of ``network.predict``'s result named as it in lower case (a field of
    #: shape [B] goes out as [B, 1]).
    outputs: tuple[str, ...] = ()
    #: Another model of the repository whose ``network.py`` and ``weights.pt`` (same version)
    #: this one serves, e.g. an explainer of a model's own weights; ``None``: its own.
    weights_from: str | None = None

    name: str
    network: Any  # the model's network.py, loaded by path
    model: Any  # the torch module built by :meth:`build`
    device: torch.device

    # ------------------------------------------------------------------ what a model defines
    def validate(self, inputs: dict[str, Tensor]) -> str | None:
        """Why one request's inputs (CPU tensors by name) are malformed, or ``None``."""
        problem: str | None = self.network.validate_inputs(inputs)
        return problem

    def build(self, payload: dict[str, Any]) -> torch.nn.Module:
        """The network of a ``weights.pt`` payload (``ValueError`` if it does not fit)."""
        model: torch.nn.Module = self.network.build_from_payload(payload)
        return model

    def prepare(self, inputs: dict[str, Tensor]) -> Any:
        """One valid request as :meth:`join` takes it (by default its tensors as they are)."""
        return inputs

    def join(self, requests: list[Any]) -> Any:
        """The prepared requests as one batch (by default each input concatenated by rows)."""
        return {name: torch.cat([r[name] for r in requests], dim=0) for name in self.inputs}

    def predict(self, batch: Any) -> dict[str, Tensor]:
        """The outputs of one joined batch by name, in the order the response lists them; each
        has one row per row of the batch's requests, in order (split back per request here)."""
        pred = self.network.predict(self.model, *(batch[n] for n in self.inputs), self.device)
        fields = {name: getattr(pred, name.lower()) for name in self.outputs}
        return {name: t.reshape(-1, 1) if t.dim() == 1 else t for name, t in fields.items()}

    # ----------------------------------------------------------------- the python backend API
    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        self.model_config = json.loads(args["model_config"])
        torch.set_num_threads(cpu_threads(self.model_config))
        model_dir = Path(args["model_repository"])
        if self.weights_from is not None:
            model_dir = model_dir.parent / self.weights_from
        version_dir = model_dir / str(args["model_version"])
        self.network = load_network(version_dir)
        payload = load_weights(version_dir)
        try:
            model = self.build(payload)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{self.name}: {exc}") from exc
        self.device = instance_device(args)
        self.model = model.to(self.device).eval()

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        prepared, rows, owners = [], [], []
        for i, request in enumerate(requests):
            read = self._read(request)
            if isinstance(read, str):
                responses[i] = error_response(read)
            else:
                prepared.append(read[0])
                rows.append(read[1])
                owners.append(i)
        if not owners:
            return responses
        try:
            outputs = self.predict(self.join(prepared))
            total = sum(rows)
            for name, tensor in outputs.items():
                if int(tensor.shape[0]) != total:
                    raise ValueError(f"output {name} has {int(tensor.shape[0])} rows, not {total}")
            start = 0
            for i, b in zip(owners, rows, strict=True):
                tensors = [as_output(n, t[start : start + b]) for n, t in outputs.items()]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += b
        except Exception as exc:
            message = f"{self.name}: inference failed: {type(exc).__name__}: {exc}"
            for i in owners:
                responses[i] = error_response(message)
        return responses

    def finalize(self) -> None:
        self.model = None
        self.network = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _read(self, request: Any) -> tuple[Any, int] | str:
        """(the request prepared, its rows), or why it is refused."""
        try:
            inputs = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    return f"{self.name}: missing input tensor {name}"
                inputs[name] = as_torch(tensor)
            problem = self.validate(inputs)
            if problem is not None:
                return f"{self.name}: malformed request: {problem}"
            return self.prepare(inputs), int(inputs[self.inputs[0]].shape[0])
        except Exception as exc:  # anything unforeseen stays confined to this request
            return f"{self.name}: malformed request: {type(exc).__name__}: {exc}"
