"""What ``medbatch synth-ehr`` does, for every format: a long or wide CSV extract
(:mod:`medbatch.synth.ehr`) or a FHIR Bulk Data ``$export`` folder (:mod:`medbatch.synth.ehr_fhir`)
of the same cohort."""

from __future__ import annotations

from pathlib import Path

from medbatch.synth.ehr import SynthStats, write_long_csv, write_wide_csv
from medbatch.synth.ehr_fhir import write_fhir_export

__all__ = ["synth_ehr_command"]


def synth_ehr_command(
    out: Path, patients: int, seed: int, fmt: str, messiness: float
) -> SynthStats:
    """Write a ``long`` or ``wide`` extract to ``out``, or for ``fhir`` an ``$export`` folder."""
    if patients < 1:
        raise ValueError("patients must be ≥ 1")
    if fmt == "long":
        return write_long_csv(Path(out), patients, seed, messiness=messiness)
    if fmt == "wide":
        return write_wide_csv(Path(out), patients, seed, messiness=messiness)
    if fmt == "fhir":
        return write_fhir_export(Path(out), patients, seed, messiness=messiness)
    raise ValueError(f"unknown format {fmt!r}; choose long, wide or fhir")
