"""Triton python backend model ``diabetes_lstm_attention``: the probability of a diabetes
complication (``RISK``) from a patient's visit sequence, the attention weight of each visit
(``ATTENTION``) and each variable's contribution to the risk logit (``CONTRIBUTION``), from the
tensors of ``workers.ehr.features.stack_sequences`` (``VALUES``, ``OBSERVED``, ``DT_YEARS``,
``LENGTH``).

A reference model trained on synthetic EHR data only (see ../MODEL_CARD.md): it proves the
pipeline and must never be used for any decision about a patient.

The requests of one ``execute`` call are scored with a single forward pass and one backward
pass (the gradient × input behind ``CONTRIBUTION``). A malformed request (missing input, wrong
shape or dtype, NaN/inf, ``LENGTH`` outside [1, 20], values outside their physiological range)
gets an error response without failing the others (``triton_torch_adapter.serving``).
"""

from triton_torch_adapter.serving import BatchedTorchModel


class TritonPythonModel(BatchedTorchModel):
    inputs = ("VALUES", "OBSERVED", "DT_YEARS", "LENGTH")
    outputs = ("RISK", "ATTENTION", "CONTRIBUTION")
