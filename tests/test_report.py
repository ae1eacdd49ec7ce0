"""The screening report: a real job's rows rendered to one HTML page with pictures."""

from __future__ import annotations

from pathlib import Path

from core.job_kinds import JobKind
from db.models import Compound, Job, JobState, LibraryEntry, Prediction, Rejection
from db.session import session_scope
from medbatch.reports.screening import render_screening_report


def test_report_shows_counts_histogram_structures_and_reasons(db_url: str, tmp_path: Path) -> None:
    with session_scope(db_url) as s:
        job = Job(
            kind=JobKind.CHEM_SCREEN,
            source="lib.smi",
            idempotency_key="k",
            state=JobState.DONE,
            params={"model_name": "molecule_gnn", "model_version": "1"},
            summary={"rows": 4, "valid": 3, "rejected": 1, "duplicates": 0},
        )
        s.add(job)
        s.flush()
        for line, (smi, key, logs) in enumerate(
            [
                ("CCO", "LFQSCWFLJHTTHZ-UHFFFAOYSA-N", 0.97),
                ("c1ccccc1", "UHOVQNZJYSORNB-UHFFFAOYSA-N", -1.45),
                ("CCCCCCCCCCCCCCCCCCCCCCCCCCCCCC", "XAAAAAAAAAAAAA-UHFFFAOYSA-N", -14.6),
            ],
            start=2,
        ):
            c = Compound(inchikey=key, canonical_smiles=smi, library="lib.smi")
            s.add(c)
            s.flush()
            s.add(
                LibraryEntry(job_id=job.id, line_no=line, record_name=f"m{line}", compound_id=c.id)
            )
            s.add(
                Prediction(
                    job_id=job.id,
                    compound_id=c.id,
                    model_name="molecule_gnn",
                    model_version="1",
                    outputs={"logS": logs},
                )
            )
        s.add(
            Rejection(
                job_id=job.id,
                line_no=5,
                record_name="bad",
                raw="C1CC(",
                reason="SMILES Parse Error: syntax error while parsing: C1CC(",
            )
        )
        job_id = job.id
    out = tmp_path / "r.html"
    with session_scope(db_url) as s:
        render_screening_report(s, job_id, out, actor="t")
    page = out.read_text()
    assert page.count("<svg") >= 1 + 3  # the histogram and the drawn molecules
    assert "Screening job" in page and "lib.smi" in page
    assert "syntax error while parsing: C1CC(" in page and "bad" in page
    assert page.count("extrapolated</span>") == 2  # the C30 alkane, at both ends' lists
    assert "<script" not in page
