"""An EHR extract as one self-contained HTML page: what came in and what was rejected, the risk
distribution of each model, and for any patient the attention of the first model with attention
over their visits as a picture (the highest-risk patients and any asked for are drawn; every
other patient can be looked up in the page, which draws the same chart from the embedded
weights). What is shown follows from the models' registry entries, not from their names.

The page names patients (whoever acts on a risk needs to know whose it is): it is written only
on request, and each writing is audited like any other access to results.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.served_models import ServedModel
from db.ehr_results import extract_models, iter_patient_scores
from db.jobs import get_job
from db.models import EhrScore, Rejection
from medbatch.reports.page import figure_svg, write_report

TOP_PATIENTS = 12
REJECTED_SHOWN = 200
#: Patients whose attention is embedded for the in-page lookup (beyond: draw with --patient).
LOOKUP_LIMIT = 50_000


def risk_histogram_svg(risks: dict[str, list[float]]) -> str:
    fig = Figure(figsize=(8, 3.0), dpi=100)
    axes = fig.subplots(1, len(risks), squeeze=False)[0]
    for ax, (model, values) in zip(axes, risks.items(), strict=True):
        ax.hist(values, bins=40, range=(0, 1), color="#2b4c7e", edgecolor="white", linewidth=0.4)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("predicted risk")
        ax.set_ylabel("patients")
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_svg(fig)


def attention_svg(attention: list[list[Any]], title: str) -> str:
    """Bars: one per visit (by date), height = attention weight; the weights sum to one."""
    days = [d for d, _ in attention]
    weights = [float(w) for _, w in attention]
    fig = Figure(figsize=(7.5, 2.4), dpi=100)
    ax = fig.subplots()
    top = max(weights) if weights else 0
    colours = ["#c0392b" if w == top else "#2b4c7e" for w in weights]
    ax.bar(range(len(days)), weights, color=colours)
    ax.set_xticks(range(len(days)), days, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("attention")
    ax.set_ylim(0, max(0.05, top * 1.15))
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_svg(fig)


def _card(
    patient_id: str, scores: dict[str, EhrScore], models: list[ServedModel], primary: ServedModel
) -> dict[str, Any]:
    shown = []
    for m in models:
        score = scores.get(m.name)
        if score is None or score.risk is None:
            continue
        shown.append(
            {
                "title": m.title,
                "risk": score.risk,
                "top_variables": [
                    v["variable"] for v in score.explanation.get("top_variables", [])
                ],
                "ood": bool(score.out_of_distribution) if m.has("OOD") else False,
            }
        )
    card: dict[str, Any] = {"patient_id": patient_id, "models": shown}
    lead = scores.get(primary.name)
    if primary.has("ATTENTION") and lead is not None and lead.risk is not None:
        card["svg"] = attention_svg(
            lead.explanation.get("attention", []),
            f"{patient_id}: {primary.title} {lead.risk:.2f}",
        )
    return card


def render_ehr_report(
    session: Session, extract_id: int, out: Path, *, actor: str, patients: list[str] | None = None
) -> Path:
    """Write the extract's HTML report to ``out`` (audited as an access to its results)."""
    job = get_job(session, extract_id)
    models = extract_models(session, extract_id)
    # Patients are ranked (and their attention drawn) by the first model with attention.
    primary = next((m for m in models if m.has("ATTENTION")), models[0])
    risks: dict[str, list[float]] = {m.name: [] for m in models}
    ood_models = [m for m in models if m.has("OOD")]
    lookup: dict[str, list[list[Any]]] = {}
    top: list[tuple[float, str]] = []
    ood: dict[str, int] = {m.name: 0 for m in ood_models}
    not_scored = 0
    for patient_id, scores in iter_patient_scores(session, extract_id):
        for s in scores:
            if s.risk is None:
                not_scored += 1
                continue
            risks.setdefault(s.model_name, []).append(s.risk)
            if s.model_name == primary.name:
                top.append((s.risk, patient_id))
                if primary.has("ATTENTION") and len(lookup) < LOOKUP_LIMIT:
                    lookup[patient_id] = s.explanation.get("attention", [])
            if s.model_name in ood:
                ood[s.model_name] += bool(s.out_of_distribution)
    top.sort(reverse=True)
    wanted = [p for _, p in top[:TOP_PATIENTS]]
    asked = list(patients or [])
    cards, missing = [], []
    for patient_id in asked + [p for p in wanted if p not in asked]:
        found = {
            s.model_name: s
            for s in session.scalars(
                select(EhrScore).where(
                    EhrScore.extract_id == extract_id, EhrScore.patient_id == patient_id
                )
            )
        }
        if found:
            cards.append(_card(patient_id, found, models, primary))
        else:
            missing.append(patient_id)
    rejected_total = session.scalar(
        select(func.count()).select_from(Rejection).where(Rejection.job_id == extract_id)
    )
    rejected = session.execute(
        select(Rejection.line_no, Rejection.record_name, Rejection.reason)
        .where(Rejection.job_id == extract_id)
        .order_by(Rejection.line_no)
        .limit(REJECTED_SHOWN)
    ).all()
    by_kind = Counter(dict((job.summary or {}).get("rejected_by_kind", {})))
    summary = dict(job.summary or {})
    counts = [
        ("measurements accepted", summary.get("accepted_rows", 0)),
        ("rows rejected", summary.get("rejected_rows", 0)),
        *((f"  … {kind.replace('_', ' ')}", n) for kind, n in sorted(by_kind.items())),
        ("patients scored", len(risks.get(primary.name, []))),
        *((f"profiles flagged out of distribution ({name})", n) for name, n in ood.items()),
        ("model × patient pairs not scored (reason in the export)", not_scored),
    ]
    return write_report(
        session,
        "ehr.html.j2",
        out,
        job_id=extract_id,
        actor=actor,
        details={"patients": len(top), "patients_drawn": len(cards)},
        job=job,
        models=job.params.get("models", {}),
        primary=primary,
        created=f"{job.created_at:%Y-%m-%d %H:%M} UTC",
        counts=counts,
        histogram=risk_histogram_svg({m: v for m, v in risks.items() if v}) if top else "",
        cards=cards,
        asked=len(asked),
        missing=missing,
        attention=primary.has("ATTENTION"),
        lookup_json=json.dumps(lookup, separators=(",", ":")).replace("</", "<\\/"),
        lookup_complete=len(lookup) == len(top),
        rejected=rejected,
        rejected_total=rejected_total,
    )
