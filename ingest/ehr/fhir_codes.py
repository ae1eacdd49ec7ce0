"""FHIR codes of the EHR variables, declared once beside :mod:`ingest.ehr.schema`.

A FHIR Bulk Data ``$export`` names what was measured with codes instead of column names, so
this table says which LOINC codes are which :data:`~ingest.ehr.schema.VARIABLES`, which
SNOMED CT answers a coded variable takes, and how UCUM unit codes are spelled in the schema's
unit tables. Values, conversions and physiological ranges stay those of ``schema.py``: an
Observation's ``valueQuantity`` goes through the same :meth:`Variable.conversion` and the same
range check as a CSV cell.

* ``OBSERVATION_CODES``: LOINC code → variable. Several codes per variable where laboratories
  report the same quantity by mass or by moles, or by method (LDL calculated / direct).
* ``PANEL_CODES``: codes whose own value is empty and whose measurements are its components
  (the blood-pressure panel 85354-9 carries systolic 8480-6 and diastolic 8462-4).
* ``ANSWERS``: variables given as a coded answer (``valueCodeableConcept``), not a quantity:
  smoking status 72166-2 with SNOMED CT answers; ``None`` marks an answer that is no value
  ("unknown if ever smoked"): such an Observation is skipped and counted, not rejected.
* ``UCUM_UNITS``: the UCUM code of a unit → its spelling in ``schema.py`` where they differ
  (``mm[Hg]`` → ``mmHg``). A ``valueQuantity`` is read by its UCUM ``code`` first, then by its
  human ``unit`` text (normalised as in ``schema.py``); a unit neither names is rejected.
* ``SKIPPED_STATUSES``: Observations that are not results (``entered-in-error``, ``cancelled``):
  skipped and counted per status.

Age and sex are not Observations: they come from the ``Patient`` resource (``birthDate`` → age
in completed years at each visit, ``gender`` → sex).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ingest.ehr.schema import VARIABLES

__all__ = [
    "ANSWERS",
    "CODE_SYSTEMS",
    "DERIVED_FROM_PATIENT",
    "GENDER_SEX",
    "OBSERVATION_CODES",
    "PANEL_CODES",
    "SKIPPED_STATUSES",
    "UCUM_SYSTEM",
    "UCUM_UNITS",
    "code_label",
    "observation_variable",
]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM_SYSTEM = "http://unitsofmeasure.org"
#: Code systems by URI, with the short name shown in counts ("LOINC 8867-4").
CODE_SYSTEMS: Mapping[str, str] = MappingProxyType(
    {LOINC: "LOINC", "urn:oid:2.16.840.1.113883.6.1": "LOINC", SNOMED: "SNOMED"}
)

OBSERVATION_CODES: Mapping[str, str] = MappingProxyType(
    {
        # HbA1c: % (NGSP) by 4548-4 and 17856-6; mmol/mol (IFCC) by 59261-8
        "4548-4": "hba1c",
        "17856-6": "hba1c",
        "59261-8": "hba1c",
        # glucose in serum/plasma and in blood, by mass and by moles
        "2345-7": "glucose",
        "2339-0": "glucose",
        "14749-6": "glucose",
        "8480-6": "sbp",
        "8462-4": "dbp",
        "39156-5": "bmi",
        "2093-3": "total_cholesterol",
        "14647-2": "total_cholesterol",
        # LDL calculated (13457-7), direct (18262-6), measured (2089-1)
        "13457-7": "ldl",
        "18262-6": "ldl",
        "2089-1": "ldl",
        "2085-9": "hdl",
        "14646-4": "hdl",
        "2571-8": "triglycerides",
        "14927-8": "triglycerides",
        # eGFR: MDRD (33914-3, 48642-3, 48643-1), CKD-EPI (62238-1), CKD-EPI 2021 (98979-8)
        "33914-3": "egfr",
        "48642-3": "egfr",
        "48643-1": "egfr",
        "62238-1": "egfr",
        "98979-8": "egfr",
        "72166-2": "smoker",
    }
)

#: Panels: the Observation's measurements are its components (blood pressure panel with all
#: children optional, and "blood pressure systolic and diastolic").
PANEL_CODES: frozenset[str] = frozenset({"85354-9", "55284-4"})

#: Coded answers (system, code) → value; None: an answer that is no value.
ANSWERS: Mapping[str, Mapping[tuple[str, str], float | None]] = MappingProxyType(
    {
        "smoker": MappingProxyType(
            {
                (SNOMED, "449868002"): 1.0,  # current every day smoker
                (SNOMED, "428041000124106"): 1.0,  # current some day smoker
                (SNOMED, "77176002"): 1.0,  # smoker, current status unknown
                (SNOMED, "428071000124103"): 1.0,  # current heavy tobacco smoker
                (SNOMED, "428061000124105"): 1.0,  # current light tobacco smoker
                (SNOMED, "8517006"): 0.0,  # former smoker (not current)
                (SNOMED, "266919005"): 0.0,  # never smoker
                (SNOMED, "266927001"): None,  # unknown if ever smoked
            }
        )
    }
)

#: UCUM codes whose schema spelling differs (others, such as mg/dL, %, kg/m2, are the same).
UCUM_UNITS: Mapping[str, str] = MappingProxyType(
    {
        "mm[Hg]": "mmHg",
        "mL/min/{1.73_m2}": "mL/min/1.73m2",
        "mL/min/1.73.m2": "mL/min/1.73m2",
        "a": "years",
    }
)

SKIPPED_STATUSES: frozenset[str] = frozenset({"entered-in-error", "cancelled"})

#: Patient.gender → the ``sex`` flag (other and unknown give no value).
GENDER_SEX: Mapping[str, float] = MappingProxyType({"male": 1.0, "female": 0.0})
#: Variables that come from the Patient resource, not from Observations.
DERIVED_FROM_PATIENT = ("age", "sex")


def observation_variable(system: str | None, code: str | None) -> str | None:
    """The variable a coding names, or None (only LOINC codes name variables)."""
    if system is None or code is None or CODE_SYSTEMS.get(system) != "LOINC":
        return None
    return OBSERVATION_CODES.get(code)


def code_label(system: str | None, code: str | None) -> str:
    """A coding as shown in the counts of unknown codes: ``LOINC 8867-4``, ``<system>|<code>``."""
    if code is None:
        return "(no code)"
    short = CODE_SYSTEMS.get(system or "")
    if short:
        return f"{short} {code}"
    return f"{system}|{code}" if system else code


def _check() -> None:
    """The table refers to the schema's variables and units (fail at import, not at 2 a.m.)."""
    for code, name in OBSERVATION_CODES.items():
        if name not in VARIABLES or name in DERIVED_FROM_PATIENT:
            raise ValueError(f"LOINC {code}: {name!r} is not an Observation variable")
    for name in ANSWERS:
        if not VARIABLES[name].flag:
            raise ValueError(f"{name}: coded answers are declared for flags only")
    for ucum, unit in UCUM_UNITS.items():
        if not any(_accepts(v.name, unit) for v in VARIABLES.values()):
            raise ValueError(f"UCUM {ucum}: {unit!r} is no variable's unit")


def _accepts(name: str, unit: str) -> bool:
    try:
        VARIABLES[name].conversion(unit)
    except ValueError:
        return False
    return True


_check()
