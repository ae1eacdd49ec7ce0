"""A screening job as one self-contained HTML page: what came in, what was scored, the
distribution of predicted solubility, the molecules at both ends drawn by RDKit with their
calibrated interval, the molecules outside the model's applicability domain with the reason, and
every rejected row with its reason. Chemists look at structures and histograms, not CSV
files."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rdkit import Chem
from rdkit.Chem.Draw import rdMolDraw2D
from sqlalchemy.orm import Session

from core.errors import MedbatchError
from core.model_registry import served_model
from core.served_models import DOMAIN_REASON, IN_DOMAIN
from db.jobs import get_job
from db.screen_results import screen_results
from medbatch.reports.molecules import data_uri, similarity_map_png
from medbatch.reports.page import figure_svg, write_report

#: Atom contributions of canonical SMILES (one list per molecule, in RDKit's atom order).
Explainer = Callable[[Sequence[str]], list[list[float]]]

#: Solubility classes commonly used for logS (mol/L) in early discovery.
BANDS = [
    (-99.0, -5.0, "poorly soluble", "#f4cccc"),
    (-5.0, -3.0, "moderately soluble", "#fff2cc"),
    (-3.0, -1.0, "soluble", "#d9ead3"),
    (-1.0, 99.0, "highly soluble", "#cfe2f3"),
]
EXTREMES = 8
REJECTED_SHOWN = 200
OUT_OF_DOMAIN_SHOWN = 200
#: The logS scale of the interval bars (values beyond it are drawn at its ends).
BAR_SCALE = (-12.0, 2.0)


@dataclass
class _Row:
    line_no: int
    name: str
    smiles: str
    logs: float
    lower: float | None = None
    upper: float | None = None
    in_domain: bool | None = None
    reason: str = ""

    def bar(self) -> dict[str, float] | None:
        """Where the interval and the value sit on :data:`BAR_SCALE`, in percent."""
        if self.lower is None or self.upper is None:
            return None
        lo, hi = BAR_SCALE

        def pct(v: float) -> float:
            return round(100 * (min(max(v, lo), hi) - lo) / (hi - lo), 2)

        left = pct(self.lower)
        return {"left": left, "width": max(pct(self.upper) - left, 0.5), "value": pct(self.logs)}


def _histogram_svg(values: list[float], outside: list[float]) -> str:
    """The logS histogram over the solubility classes; out-of-domain molecules stacked on top
    in their own colour."""
    fig = Figure(figsize=(7.5, 3.2), dpi=100)  # no pyplot: no global state, no display
    ax = fig.subplots()
    every = values + outside
    lo, hi = (min(every), max(every)) if every else (-8.0, 2.0)
    lo, hi = min(lo, -8.0), max(hi, 2.0)
    for start, end, label, colour in BANDS:
        ax.axvspan(max(start, lo), min(end, hi), color=colour, alpha=0.8, lw=0, label=label)
    ax.hist(
        [values, outside],
        bins=40,
        range=(lo, hi),
        stacked=True,
        color=["#2b4c7e", "#e69138"],
        label=["in domain", "out of domain"],
        edgecolor="white",
        linewidth=0.4,
    )
    ax.set_xlabel("predicted logS  (log10 mol/L)")
    ax.set_ylabel("molecules")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_svg(fig)


def _structure_svg(smiles: str, size: int = 200) -> str:
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return ""
    drawer = rdMolDraw2D.MolDraw2DSVG(size, size)
    drawer.drawOptions().clearBackground = False  # type: ignore[assignment]
    drawer.DrawMolecule(mol)
    drawer.FinishDrawing()
    text = drawer.GetDrawingText()
    return text[text.index("<svg") :]


def _maps(explain: Explainer | None, smiles: list[str]) -> tuple[dict[str, str], str]:
    """Similarity maps (data URIs) of ``smiles`` by SMILES, and why there are none if so."""
    if explain is None or not smiles:
        return {}, ""
    try:
        weights = explain(smiles)
    except MedbatchError as exc:  # Triton down: the report still renders, without maps
        return {}, f"atom contributions unavailable: {exc}"
    return {
        s: data_uri(similarity_map_png(s, w, 220)) for s, w in zip(smiles, weights, strict=True)
    }, ""


def render_screening_report(
    session: Session, job_id: int, out: Path, *, actor: str, explain: Explainer | None = None
) -> Path:
    """Write the job's HTML report to ``out`` (audited as an access to its results); with
    ``explain``, the molecules at both ends are drawn with their atom contributions."""
    job = get_job(session, job_id)
    model = served_model(str(job.params["model_name"]))
    field = next(iter(model.fields.values()))  # the value drawn (logS)
    low, high = model.target_range or (float("-inf"), float("inf"))
    lower_field, upper_field = (
        next((n for n, _ in model.derived if n.endswith(suffix)), None)
        for suffix in ("_lower", "_upper")
    )
    scored: list[_Row] = []
    rejected: list[dict[str, Any]] = []
    rejected_total = 0
    _, rows = screen_results(session, job_id)
    for row in rows:
        if row["status"] == "scored" and row[field] is not None:
            scored.append(
                _Row(
                    row["line_no"],
                    row["record_name"] or "",
                    row["canonical_smiles"],
                    row[field],
                    lower=row.get(lower_field) if lower_field else None,
                    upper=row.get(upper_field) if upper_field else None,
                    in_domain=row.get(IN_DOMAIN),
                    reason=row.get(DOMAIN_REASON) or "",
                )
            )
        elif row["status"] == "rejected":
            rejected_total += 1
            if len(rejected) < REJECTED_SHOWN:
                rejected.append(row)
    ordered = sorted(scored, key=lambda r: r.logs)
    outside = [r for r in scored if r.in_domain is False]
    extremes = [
        ("Least soluble", ordered[:EXTREMES]),
        ("Most soluble", ordered[::-1][:EXTREMES]),
    ]
    drawn = list(dict.fromkeys(r.smiles for _, rows in extremes for r in rows))
    maps, maps_note = _maps(explain, drawn) if model.explainer else ({}, "")
    summary = dict(job.summary or {})
    counts = [
        ("rows read", summary.get("rows", 0)),
        ("valid molecules", summary.get("valid", 0)),
        ("rejected rows", summary.get("rejected", 0)),
        ("duplicates in the file", summary.get("duplicates", 0)),
        ("scored earlier (not rescored)", summary.get("already_scored", 0)),
        ("scored molecules in this report", len(scored)),
        (
            f"outside the training range {low} … {high} (extrapolated)",
            sum(1 for r in scored if not low <= r.logs <= high),
        ),
    ]
    if model.has_domain():
        counts.append(("outside the applicability domain (scored, flagged)", len(outside)))
    return write_report(
        session,
        "screening.html.j2",
        out,
        job_id=job_id,
        actor=actor,
        details={"scored": len(scored), "rejected": rejected_total},
        job=job,
        model=html.escape(str(job.params.get("model_name", ""))),
        version=html.escape(str(job.params.get("model_version", ""))),
        created=f"{job.created_at:%Y-%m-%d %H:%M} UTC",
        counts=counts,
        scored=len(scored),
        histogram=_histogram_svg(
            [r.logs for r in scored if r.in_domain is not False], [r.logs for r in outside]
        ),
        has_domain=model.has_domain(),
        maps_note=maps_note,
        has_maps=bool(maps),
        bar_scale=BAR_SCALE,
        outside=[{**r.__dict__, "bar": r.bar()} for r in outside[:OUT_OF_DOMAIN_SHOWN]],
        outside_total=len(outside),
        extremes=[
            (
                title,
                [
                    {
                        **r.__dict__,
                        "svg": "" if r.smiles in maps else _structure_svg(r.smiles),
                        "map": maps.get(r.smiles),
                        "extrapolated": not low <= r.logs <= high,
                        "bar": r.bar(),
                    }
                    for r in rows
                ],
            )
            for title, rows in extremes
        ],
        rejected=rejected,
        rejected_total=rejected_total,
    )
