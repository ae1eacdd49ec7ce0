"""Triton python backend model ``lung_ct_cnn``: probability that a chest CT holds a nodule-like
lesion (``STUDY_PROB``) and a score per slice of the model grid (``SLICE_SCORES``), from the
[64, 128, 128] lung-windowed volume of ``workers/dicom/preprocess.py`` (``VOLUME``).

A reference model trained on synthetic CT only (see ../MODEL_CARD.md): it proves the pipeline
and must never be used for diagnosis.

The requests of one ``execute`` call are scored with a single forward pass; a malformed request
(wrong shape or dtype, NaN/inf, values outside [0, 1]) gets an error response without failing
the others (``triton_torch_adapter.serving``).
"""

from triton_torch_adapter.serving import BatchedTorchModel, Tensor


class TritonPythonModel(BatchedTorchModel):
    inputs = ("VOLUME",)
    outputs = ("STUDY_PROB", "SLICE_SCORES")

    def validate(self, inputs: dict[str, Tensor]) -> str | None:
        return self.network.validate_volumes(inputs["VOLUME"])
