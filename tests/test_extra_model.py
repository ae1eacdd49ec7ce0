"""A new EHR model is its folder plus one registry entry: a logistic regression trained here,
registered from outside the tree (``MEDBATCH_EXTRA_MODELS``) and served by the real Triton, is
scored, stored, exported and drawn next to the built-in models with no change to scoring,
export or report code."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from core.served_models import CVD_AUTOENCODER, DIABETES_LSTM_ATTENTION
from core.settings import REPO_ROOT, Settings
from db.models import EhrScore, JobState
from db.session import session_scope
from ingest.ehr.schema import ModelSchema
from medbatch.services.ehr import submit_extract, truth_auroc
from medbatch.services.reports import render_report
from medbatch.services.results import export_results
from medbatch.synth.ehr import write_long_csv
from medbatch.training.ehr import load_cohort
from tests.conftest import make_settings, private_stack
from tests.fixtures.extra_model.registry import GLYCAEMIA_LOGISTIC
from tests.helpers import wait_for_job
from workers.ehr.features import latest_profiles

pytestmark = [pytest.mark.server, pytest.mark.slow]

FIXTURE = Path(__file__).parent / "fixtures" / "extra_model" / GLYCAEMIA_LOGISTIC.name


def _train(workdir: Path) -> dict[str, torch.Tensor]:
    """Logistic regression by gradient descent on standardised latest profiles (numpy only)."""
    cohort = load_cohort(600, seed=91, workdir=workdir, outcome="diabetes_complication")
    schema = ModelSchema(GLYCAEMIA_LOGISTIC.name, GLYCAEMIA_LOGISTIC.variables, False, None)
    values, observed = latest_profiles(cohort.measurements, schema)
    seen = observed > 0
    mean = np.array([values[seen[:, j], j].mean() for j in range(values.shape[1])])
    std = np.array([values[seen[:, j], j].std() + 1e-6 for j in range(values.shape[1])])
    z = np.where(seen, (values - mean) / std, 0.0)
    y = cohort.label.astype(np.float64)
    coef, bias = np.zeros(z.shape[1]), 0.0
    for _ in range(500):
        p = 1 / (1 + np.exp(-(z @ coef + bias)))
        coef -= 0.5 * z.T @ (p - y) / len(y)
        bias -= 0.5 * float((p - y).mean())
    return {
        name: torch.tensor(value, dtype=torch.float32)
        for name, value in (("mean", mean), ("std", std), ("coef", coef), ("bias", bias))
    }


@pytest.fixture(scope="module")
def extra_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tmp = tmp_path_factory.mktemp("extra-model")
    repo = tmp / "models"
    for model in (DIABETES_LSTM_ATTENTION, CVD_AUTOENCODER):
        shutil.copytree(REPO_ROOT / "triton_models" / model.name, repo / model.name)
    shutil.copytree(FIXTURE, repo / GLYCAEMIA_LOGISTIC.name)
    torch.save(_train(tmp), repo / GLYCAEMIA_LOGISTIC.name / "1" / "weights.pt")
    settings = make_settings(
        tmp / "stack",
        triton_model_repository=repo,
        extra_models="tests.fixtures.extra_model.registry",
    )
    with private_stack(settings, workers=1, beat=False):
        yield settings


def test_an_extra_ehr_model_is_scored_stored_exported_and_shown(
    extra_settings: Settings, tmp_path: Path
) -> None:
    s = extra_settings
    extract = tmp_path / "night.csv"
    stats = write_long_csv(extract, 150, seed=5, messiness=0.02)
    job_id = submit_extract(s, extract, actor="test").job_id
    job = wait_for_job(s, job_id, timeout=300)
    assert job.state == JobState.DONE.value, job.error
    assert GLYCAEMIA_LOGISTIC.name in job.params["models"]

    # scored and stored: one row per patient, a risk and contributions for the model's variables
    with session_scope(s.database_url) as session:
        scores = session.scalars(
            select(EhrScore).where(
                EhrScore.extract_id == job_id, EhrScore.model_name == GLYCAEMIA_LOGISTIC.name
            )
        ).all()
        diabetes = session.scalars(
            select(EhrScore.patient_id).where(
                EhrScore.extract_id == job_id,
                EhrScore.model_name == DIABETES_LSTM_ATTENTION.name,
            )
        ).all()
        assert {x.patient_id for x in scores} == set(diabetes)
        scored = [x for x in scores if x.risk is not None]
        assert len(scored) > 100
        for x in scored:
            assert 0.0 < x.risk < 1.0
            assert set(x.explanation["contributions"]) == set(GLYCAEMIA_LOGISTIC.variables)
            assert x.out_of_distribution is not None  # the model has an OOD output
            assert "attention" not in x.explanation  # and no attention
    # a model trained on the same generator ranks its outcome better than chance
    auroc = truth_auroc(s, job_id, stats.truth_path)[GLYCAEMIA_LOGISTIC.name]
    assert auroc is not None and auroc > 0.6

    # exported: its own columns beside the built-in models'
    out = tmp_path / "results.csv"
    export_results(s, job_id, out, actor="test")
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    assert {"glycaemia_risk", "glycaemia_out_of_distribution", "glycaemia_top_variables"} <= columns
    assert "glycaemia_top_visits" not in columns and "diabetes_top_visits" in columns
    by_patient = {r["patient_id"]: r for r in rows if r["status"] == "scored"}
    for x in scored:
        assert float(by_patient[x.patient_id]["glycaemia_risk"]) == pytest.approx(x.risk)

    # shown: the report draws its risk distribution and names it on the patient cards
    page = render_report(s, job_id, tmp_path / "report.html", actor="test").read_text()
    assert GLYCAEMIA_LOGISTIC.name in page  # histogram panel title
    assert GLYCAEMIA_LOGISTIC.title in page  # on the cards
