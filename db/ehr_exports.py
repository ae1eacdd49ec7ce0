"""Results of an EHR extract for CSV or Parquet export: one row per scored patient (every model's
risk and explanation side by side), then one row per rejected line of the file with its reason.

Patients stream in pages of ``page`` identifiers, so exporting a large extract stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import EhrScore

DIABETES = "diabetes_lstm_attention"
CVD = "cvd_autoencoder"

SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("status", pa.string()),
        ("diabetes_risk", pa.float64()),
        ("diabetes_model_version", pa.string()),
        ("diabetes_top_visits", pa.string()),
        ("diabetes_top_variables", pa.string()),
        ("diabetes_not_scored", pa.string()),
        ("cvd_risk", pa.float64()),
        ("cvd_model_version", pa.string()),
        ("cvd_out_of_distribution", pa.bool_()),
        ("cvd_reconstruction_error", pa.float64()),
        ("cvd_top_variables", pa.string()),
        ("cvd_not_scored", pa.string()),
        ("visits", pa.int64()),
        ("measurements", pa.int64()),
        ("line_no", pa.int64()),
        ("reason", pa.string()),
    ]
)
COLUMNS = list(SCHEMA.names)


def _variables(explanation: dict[str, Any]) -> str:
    return "; ".join(
        f"{v['variable']} {v['contribution']:+.3f}" for v in explanation.get("top_variables", [])
    )


def _visits(explanation: dict[str, Any]) -> str:
    return "; ".join(f"{v['day']} {v['weight']:.2f}" for v in explanation.get("top_visits", []))


def _patient_row(patient_id: str, scores: list[EhrScore]) -> dict[str, Any]:
    row: dict[str, Any] = {**dict.fromkeys(COLUMNS), "patient_id": patient_id, "status": "scored"}
    for s in scores:
        if s.model_name == DIABETES:
            row.update(
                diabetes_risk=s.risk,
                diabetes_model_version=s.model_version,
                diabetes_top_visits=_visits(s.explanation),
                diabetes_top_variables=_variables(s.explanation),
                diabetes_not_scored=s.not_scored,
                visits=s.visits,
            )
        elif s.model_name == CVD:
            row.update(
                cvd_risk=s.risk,
                cvd_model_version=s.model_version,
                cvd_out_of_distribution=s.out_of_distribution,
                cvd_reconstruction_error=s.reconstruction_error,
                cvd_top_variables=_variables(s.explanation),
                cvd_not_scored=s.not_scored,
            )
        row["measurements"] = s.measurements
    return row


def iter_patient_scores(
    session: Session, extract_id: int, page: int = 2000
) -> Iterator[tuple[str, list[EhrScore]]]:
    """(patient id, that patient's scores) in identifier order."""
    last = ""
    while True:
        ids = list(
            session.scalars(
                select(EhrScore.patient_id)
                .where(EhrScore.extract_id == extract_id, EhrScore.patient_id > last)
                .group_by(EhrScore.patient_id)
                .order_by(EhrScore.patient_id)
                .limit(page)
            )
        )
        if not ids:
            return
        by_patient: dict[str, list[EhrScore]] = {i: [] for i in ids}
        for score in session.scalars(
            select(EhrScore)
            .where(EhrScore.extract_id == extract_id, EhrScore.patient_id.in_(ids))
            .order_by(EhrScore.patient_id, EhrScore.model_name)
        ):
            by_patient[score.patient_id].append(score)
        yield from by_patient.items()
        last = ids[-1]


def _rejected(session: Session, extract_id: int, page: int) -> Iterator[dict[str, Any]]:
    from db.exports import iter_rejections  # db.exports dispatches to this module

    for r in iter_rejections(session, extract_id, page):
        yield {
            **dict.fromkeys(COLUMNS),
            "status": "rejected",
            "line_no": r.line_no,
            "reason": r.reason,
        }


def iter_ehr_results(
    session: Session, extract_id: int, page: int = 2000
) -> Iterator[dict[str, Any]]:
    for patient_id, scores in iter_patient_scores(session, extract_id, page):
        yield _patient_row(patient_id, scores)
    yield from _rejected(session, extract_id, page)
