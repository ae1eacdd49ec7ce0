"""One molecule scored and explained: its result fields (value, spread, calibrated interval,
applicability domain) and each atom's contribution, computed by the model's explainer on Triton
and drawn as an RDKit similarity map. ``medbatch explain`` and
``GET /api/v1/molecules/explain`` call :func:`explain_molecule`; the screening report calls
:func:`atom_contributions` for the molecules it draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import ConfigurationError, InputError
from core.model_registry import served_model
from core.served_models import ServedModel
from core.settings import Settings
from db import audit
from db.session import session_scope
from ingest.chem.canonicalize import Invalid, canonicalize
from workers import triton_client
from workers.chem.domain import applicability_for
from workers.chem.featurize import featurize_smiles


@dataclass(frozen=True)
class AtomContribution:
    index: int  # atom index in the canonical SMILES
    symbol: str
    contribution: float  # in the model's unit (logS): positive raises the prediction


@dataclass(frozen=True)
class Explanation:
    input: str
    smiles: str  # canonical
    inchikey: str
    model_name: str
    model_version: str
    values: dict[str, Any]  # the model's result fields, as exports name them
    atoms: list[AtomContribution] = field(default_factory=list)
    png: bytes = b""  # the similarity map

    def as_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "smiles": self.smiles,
            "inchikey": self.inchikey,
            "model_name": self.model_name,
            "model_version": self.model_version,
            **self.values,
            "atoms": [a.__dict__ for a in self.atoms],
        }


def _infer(
    settings: Settings, model: ServedModel, arrays: dict[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    return triton_client.infer(
        settings.triton_grpc_url,
        model.name,
        model.version(settings),
        arrays,
        outputs,
        timeout_s=settings.triton_timeout_s,
        request_id="explain",
    )


def _explainer(settings: Settings, model: ServedModel) -> ServedModel:
    if model.explainer is None:
        raise ConfigurationError(f"model {model.name} has no explainer for atom contributions")
    return served_model(model.explainer, settings)


def atom_contributions(
    settings: Settings, smiles: Sequence[str], model_name: str | None = None
) -> list[list[float]]:
    """Each atom's contribution (in the atom order of ``Chem.MolFromSmiles``) for each of the
    canonical ``smiles``, from the model's explainer on Triton (one request)."""
    if not smiles:
        return []
    model = served_model(model_name or settings.chem_model_name, settings)
    explainer = _explainer(settings, model)
    arrays = featurize_smiles(list(smiles))
    out = _infer(settings, explainer, arrays, list(explainer.outputs))[explainer.outputs[0]]
    counts = arrays["N_ATOMS"][:, 0]
    return [[float(v) for v in out[i, :n]] for i, n in enumerate(counts)]


def explain_molecule(
    settings: Settings, smiles: str, *, actor: str, model_name: str | None = None
) -> Explanation:
    """Score and explain one molecule (a SMILES as a user typed it); audited."""
    parsed = canonicalize(smiles)
    if isinstance(parsed, Invalid):
        raise InputError(f"not a valid molecule: {parsed.reason}")
    model = served_model(model_name or settings.chem_model_name, settings)
    arrays = featurize_smiles([parsed.smiles])
    out = _infer(settings, model, arrays, list(model.fields))
    values: dict[str, Any] = {
        name: float(out[t].reshape(-1)[0]) for t, name in model.fields.items()
    }
    applicability = applicability_for(model, model.version(settings), settings)
    if applicability is not None:
        value_field, spread_field = list(model.fields.values())[:2]
        (derived,) = applicability.assess(
            [parsed.smiles], [values[value_field]], [values[spread_field]]
        )
        values.update(zip([name for name, _ in model.derived], derived, strict=True))
    (weights,) = atom_contributions(settings, [parsed.smiles], model.name)
    from rdkit import Chem

    from medbatch.reports.molecules import similarity_map_png  # matplotlib: only when drawn

    mol = Chem.MolFromSmiles(parsed.smiles)
    atoms = [
        AtomContribution(a.GetIdx(), a.GetSymbol(), round(w, 6))
        for a, w in zip(mol.GetAtoms(), weights, strict=True)
    ]
    with session_scope(settings.database_url) as session:
        audit.append(
            session,
            actor=actor,
            action="molecule.explain",
            subject=f"inchikey:{parsed.inchikey}",
            details={"model": model.name, "version": model.version(settings)},
        )
    return Explanation(
        input=smiles,
        smiles=parsed.smiles,
        inchikey=parsed.inchikey,
        model_name=model.name,
        model_version=model.version(settings),
        values=values,
        atoms=atoms,
        png=similarity_map_png(parsed.smiles, weights),
    )
