"""Triton python backend model ``cvd_autoencoder``: the probability of a cardiovascular event
(``RISK``) from a patient's latest profile, the autoencoder's reconstruction error of that
profile (``RECON_ERROR``), whether it lies outside what the model was trained on (``OOD``) and
each variable's contribution to the risk logit (``CONTRIBUTION``), from the tensors of
``workers.ehr.features.latest_profile`` (``VALUES``, ``OBSERVED``).

A reference model trained on synthetic EHR data only (see ../MODEL_CARD.md): it proves the
pipeline and must never be used for any decision about a patient.

The requests of one ``execute`` call are scored with a single forward pass (which includes the
occlusion copies behind ``CONTRIBUTION``). A malformed request (missing input, wrong shape or
dtype, NaN/inf, a patient with no observed variable, values outside their physiological range)
gets an error response without failing the others (``triton_torch_adapter.serving``).
"""

import torch

from triton_torch_adapter.serving import BatchedTorchModel


class TritonPythonModel(BatchedTorchModel):
    inputs = ("VALUES", "OBSERVED")

    def validate(self, inputs: dict[str, torch.Tensor]) -> str | None:
        return self.network.validate_inputs(inputs)

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.network.predict(self.model, *(batch[n] for n in self.inputs), self.device)
        return {
            "RISK": pred.risk.reshape(-1, 1),
            "RECON_ERROR": pred.recon_error.reshape(-1, 1),
            "OOD": pred.ood.reshape(-1, 1),
            "CONTRIBUTION": pred.contribution,
        }
