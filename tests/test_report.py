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
        reason = "size outside training range: 30 heavy atoms (training 2–29)"
        for line, (smi, key, logs, domain) in enumerate(
            [
                ("CCO", "LFQSCWFLJHTTHZ-UHFFFAOYSA-N", 0.97, {"in_domain": True}),
                ("c1ccccc1", "UHOVQNZJYSORNB-UHFFFAOYSA-N", -1.45, {}),  # stored before issue 15
                (
                    "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
                    "XAAAAAAAAAAAAA-UHFFFAOYSA-N",
                    -14.6,
                    {"in_domain": False, "domain_reason": reason},
                ),
            ],
            start=2,
        ):
            interval = (
                {"logS_std": 0.3, "logS_lower": logs - 0.97, "logS_upper": logs + 0.97}
                if domain
                else {}
            )
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
                    outputs={"logS": logs, **interval, **domain},
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
    # Issue 15: intervals as bars, the out-of-domain molecule coloured with its reason, listed.
    assert page.count('class="card ood"') == 2  # the C30 alkane, at both ends' lists
    assert page.count(reason) == 3  # both cards and the out-of-domain table
    assert page.count('<tr class="ood">') == 1
    assert "[0.00, 1.94]" in page  # ethanol's interval; benzene (no interval stored) has none
    assert page.count('class="iv"') == 2 * 2 + 1  # ethanol and C30 in both lists, + the table
    assert "outside the applicability domain (scored, flagged)" in page
    assert "<script" not in page
