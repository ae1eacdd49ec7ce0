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

from triton_torch_adapter.serving import BatchedTorchModel


class TritonPythonModel(BatchedTorchModel):
    inputs = ("VALUES", "OBSERVED")
    outputs = ("RISK", "RECON_ERROR", "OOD", "CONTRIBUTION")
