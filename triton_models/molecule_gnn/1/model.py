"""Triton python backend model ``molecule_gnn``: aqueous solubility (logS) of molecules sent as
the padded categorical arrays of ``workers/chem/featurize.py``.

One ``execute`` call may carry several requests with different padded sizes (dynamic batching
with ``allow_ragged_batch``). Each request is validated and flattened into a graph batch on its
own; the valid ones are concatenated into one graph batch and scored with a single forward pass
of the fused ensemble; a malformed request gets an error response without failing the others
(``triton_torch_adapter.serving``).
"""

from typing import Any

from triton_torch_adapter.serving import BatchedTorchModel, Tensor


class TritonPythonModel(BatchedTorchModel):
    inputs = ("ATOM_FEATS", "N_ATOMS", "BOND_INDEX", "BOND_FEATS", "N_BONDS")

    def build(self, payload: dict[str, Any]) -> Any:
        model = self.network.build_for_serving(payload)
        self.mean = float(payload["target_mean"])
        self.std = float(payload["target_std"])
        return model

    def validate(self, inputs: dict[str, Tensor]) -> str | None:
        return self.network.validate_padded(*(inputs[n] for n in self.inputs))

    def prepare(self, inputs: dict[str, Tensor]) -> tuple[Any, ...]:
        """The request as a flat graph batch ``(x, edge_index, edge_attr, batch, molecules)``."""
        graph = self.network.padded_to_batch(*(inputs[n] for n in self.inputs))
        return (*graph, int(inputs["ATOM_FEATS"].shape[0]))

    def join(self, requests: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        return self.network.concat_graphs(requests)

    def predict(self, batch: tuple[Any, ...]) -> dict[str, Tensor]:
        logs, spread = self.network.predict_logs_and_spread(
            self.model, batch, self.device, self.mean, self.std
        )
        return {"LOGS": logs.reshape(-1, 1), "LOGS_STD": spread.reshape(-1, 1)}
