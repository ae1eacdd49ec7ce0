"""Triton python backend model ``molecule_gnn_explain``: each atom's contribution to the logS
that ``molecule_gnn`` predicts (gradient × input on the atom embeddings, averaged over the
ensemble's members), for the same padded arrays of ``workers/chem/featurize.py``.

It serves ``molecule_gnn``'s own ``network.py`` and ``weights.pt`` (``weights_from``), so the
explanation is always of the served weights. Output ``ATOM_CONTRIB`` [B, atoms]: molecule *i*'s
atoms in input order from column 0, zero past its last atom.
"""

from typing import Any

from triton_torch_adapter.serving import BatchedTorchModel, Tensor


class TritonPythonModel(BatchedTorchModel):
    inputs = ("ATOM_FEATS", "N_ATOMS", "BOND_INDEX", "BOND_FEATS", "N_BONDS")
    outputs = ("ATOM_CONTRIB",)
    weights_from = "molecule_gnn"

    def build(self, payload: dict[str, Any]) -> Any:
        self.std = float(payload["target_std"])
        return self.network.build_from_payload(payload)

    def validate(self, inputs: dict[str, Tensor]) -> str | None:
        return self.network.validate_padded(*(inputs[n] for n in self.inputs))

    def prepare(self, inputs: dict[str, Tensor]) -> tuple[Any, ...]:
        graph = self.network.padded_to_batch(*(inputs[n] for n in self.inputs))
        return (*graph, int(inputs["ATOM_FEATS"].shape[0]))

    def join(self, requests: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        return self.network.concat_graphs(requests)

    def predict(self, batch: tuple[Any, ...]) -> dict[str, Tensor]:
        graph = tuple(t.to(self.device) if hasattr(t, "to") else t for t in batch)
        contrib = self.network.atom_contributions(self.model, graph, self.std)
        padded = self.network.pad_per_molecule(contrib, graph[3], graph[4])
        return {"ATOM_CONTRIB": padded.float().cpu()}
