"""The served models medbatch ships: one entry each, saying what Triton is asked, what comes
back, and what medbatch makes of it. :mod:`core.model_registry` adds a site's own entries and
answers lookups; scoring, storing, exports and reports loop over the entries, so a new model is its
folder under ``triton_models/`` plus one entry; no other code names a model.

The Triton side of each fact (tensor names, shapes, types) is the model's ``config.pbtxt``; a
test checks that every entry's inputs and outputs are there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from core.job_kinds import Flow

if TYPE_CHECKING:
    from core.settings import Settings

#: The type of a stored result field, as exports write it.
FieldType = Literal["float", "bool", "str"]
#: The derived field flagging a molecule inside its model's applicability domain, and the one
#: saying why not: exports filter on the first, reports and summaries count and list them.
IN_DOMAIN = "in_domain"
DOMAIN_REASON = "domain_reason"


@dataclass(frozen=True, eq=False)  # an entry is itself: compared and hashed by identity
class ServedModel:
    """A model Triton serves and how medbatch uses it.

    ``outputs`` are the tensors the worker asks for. For EHR models, ``RISK`` and
    ``CONTRIBUTION`` are required; ``ATTENTION`` (sequence models), ``OOD`` and ``RECON_ERROR``
    are optional, and each one present adds its result field, export column and report section.
    ``fields`` maps an output tensor to the name its value is stored and exported under (chem).
    ``derived`` are result fields the worker adds beside them, in export order, from the
    model's ``applicability_file`` (a JSON file in the model version directory, written by its
    ``train.py``: the calibrated interval and the applicability domain); the interval is taken
    around the first of ``fields`` and scaled, when normalised, by the second (its spread).
    ``explainer`` is the Triton model that gives per-atom contributions for the same inputs.
    An EHR model reads ``variables`` (declared in ``ingest/ehr/schema.py``, in input order):
    over the latest ``max_visits`` visits when it is a sequence model, else each variable's
    latest value.
    """

    name: str
    flow: Flow
    title: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    description: str = ""
    version_setting: str | None = None
    default_version: str = "1"
    fields: dict[str, str] = field(default_factory=dict)
    variables: tuple[str, ...] = ()
    max_visits: int | None = None
    column_prefix: str = ""
    truth_label: str | None = None
    target_range: tuple[float, float] | None = None
    derived: tuple[tuple[str, FieldType], ...] = ()
    applicability_file: str | None = None
    explainer: str | None = None

    def version(self, settings: Settings) -> str:
        """The version to ask Triton for (a setting, so a site can pin or move it)."""
        if self.version_setting is None:
            return self.default_version
        return str(getattr(settings, self.version_setting))

    def has(self, output: str) -> bool:
        return output in self.outputs

    def has_domain(self) -> bool:
        """Whether results carry the applicability-domain flag."""
        return any(name == IN_DOMAIN for name, _ in self.derived)

    def result_fields(self) -> list[tuple[str, FieldType]]:
        """Every stored result field with its type, in export order: the outputs' fields
        (floats), then the derived ones."""
        return [(name, "float") for name in self.fields.values()] + list(self.derived)


MOLECULE_GNN = ServedModel(
    name="molecule_gnn",
    flow="chem",
    title="aqueous solubility (logS)",
    inputs=("ATOM_FEATS", "N_ATOMS", "BOND_INDEX", "BOND_FEATS", "N_BONDS"),
    outputs=("LOGS", "LOGS_STD"),
    version_setting="chem_model_version",
    # logS: the ensemble's mean; logS_std: the spread of its members. The worker adds a
    # calibrated 90 % interval and the applicability domain from the file train.py writes.
    fields={"LOGS": "logS", "LOGS_STD": "logS_std"},
    derived=(
        ("logS_lower", "float"),
        ("logS_upper", "float"),
        (IN_DOMAIN, "bool"),
        (DOMAIN_REASON, "str"),
    ),
    applicability_file="applicability.json",
    explainer="molecule_gnn_explain",
    # logS range of the training set (Huuskonen, 1,025 molecules; see its model card):
    # predictions outside it are extrapolations and are flagged as such.
    target_range=(-11.62, 1.58),
)
MOLECULE_GNN_EXPLAIN = ServedModel(
    name="molecule_gnn_explain",
    flow="chem",
    title="atom contributions to logS",
    description="gradient × input on the atom embeddings of molecule_gnn's served weights",
    inputs=MOLECULE_GNN.inputs,
    outputs=("ATOM_CONTRIB",),
    version_setting="chem_model_version",
)
LUNG_CT_CNN = ServedModel(
    name="lung_ct_cnn",
    flow="dicom",
    title="nodule-like lesion in a chest CT",
    inputs=("VOLUME",),
    outputs=("STUDY_PROB", "SLICE_SCORES"),
    version_setting="dicom_model_version",
)
DIABETES_LSTM_ATTENTION = ServedModel(
    name="diabetes_lstm_attention",
    flow="ehr",
    title="diabetes-complication risk",
    description="diabetes-complication risk from the visit sequence, attention weight per visit",
    inputs=("VALUES", "OBSERVED", "DT_YEARS", "LENGTH"),
    outputs=("RISK", "ATTENTION", "CONTRIBUTION"),
    version_setting="ehr_diabetes_model_version",
    variables=tuple(
        ["age", "hba1c", "glucose", "sbp", "dbp", "bmi", "ldl", "hdl", "triglycerides", "egfr"]
    ),
    max_visits=20,
    column_prefix="diabetes",
    truth_label="diabetes_complication_label",
)
CVD_AUTOENCODER = ServedModel(
    name="cvd_autoencoder",
    flow="ehr",
    title="CVD risk",
    description="CVD risk from the latest profile; reconstruction error flags "
    "out-of-distribution profiles",
    inputs=("VALUES", "OBSERVED"),
    outputs=("RISK", "RECON_ERROR", "OOD", "CONTRIBUTION"),
    version_setting="ehr_cvd_model_version",
    variables=tuple(
        ["age", "sex", "sbp", "dbp", "bmi", "total_cholesterol", "hdl", "ldl", "smoker", "hba1c"]
    ),
    column_prefix="cvd",
    truth_label="cvd_label",
)
BUILTIN: tuple[ServedModel, ...] = (
    MOLECULE_GNN,
    MOLECULE_GNN_EXPLAIN,
    LUNG_CT_CNN,
    DIABETES_LSTM_ATTENTION,
    CVD_AUTOENCODER,
)
