"""Issue 15 through the real stack (CLI → Redis → Celery worker → Triton → database → every
export): each scored molecule carries its members' spread, a calibrated interval and its
applicability domain; a salt, a metal complex and a C50 alkane are out of domain with a reason
while aspirin, caffeine and ibuprofen are in."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from medbatch.cli import app
from tests.helpers import wait_for_job, write_smi
from tests.medbatch.api.conftest import Api

pytestmark = [pytest.mark.server]

COLUMNS = ["logS", "logS_std", "logS_lower", "logS_upper", "in_domain", "domain_reason"]
IN = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
    "ibuprofen": "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
}
OUT = {
    "table-salt": ("[Na+].[Cl-]", "element not in training data: Na"),
    "cisplatin": ("N.N.Cl[Pt]Cl", "element not in training data: Pt"),
    "pentacontane": ("C" * 50, "size outside training range: 50 heavy atoms"),
}


def test_every_export_carries_interval_and_domain(api: Api, tmp_path: Path) -> None:
    lines = [f"{smi}\t{name}" for name, smi in IN.items()]
    lines += [f"{smi}\t{name}" for name, (smi, _) in OUT.items()]
    lines += ["C1CC(\tbroken"]
    library = write_smi(tmp_path / "trust.smi", lines)
    runner = CliRunner()
    screened = runner.invoke(app, ["screen", str(library), "--force", "--timeout", "300"])
    assert screened.exit_code == 0, screened.output
    assert "out of domain (scored, flagged)" in screened.output
    row = next(x for x in screened.output.splitlines() if "out of domain" in x)
    assert row.split()[-2] == str(len(OUT)), row  # the table's value cell, before the border
    found = re.search(r"job (\d+): trust\.smi", screened.output)
    assert found, screened.output
    job_id = int(found.group(1))
    assert wait_for_job(api.settings, job_id).state == "done"

    out_csv = tmp_path / "all.csv"
    assert runner.invoke(app, ["results", str(job_id), "--out", str(out_csv)]).exit_code == 0
    rows = {r["record_name"]: r for r in csv.DictReader(out_csv.open())}
    header = list(next(iter(rows.values())))
    assert header[header.index("logS") : header.index("logS") + len(COLUMNS)] == COLUMNS
    for name in IN:
        r = rows[name]
        assert r["in_domain"] == "True" and r["domain_reason"] == "", r
        lower, value, upper = float(r["logS_lower"]), float(r["logS"]), float(r["logS_upper"])
        assert lower < value < upper and float(r["logS_std"]) > 0
        assert -6 < value < 1  # these drugs are soluble to sparingly soluble
    for name, (_, reason) in OUT.items():
        r = rows[name]
        assert r["status"] == "scored" and r["logS"], r  # still scored, and flagged
        assert r["in_domain"] == "False" and reason in r["domain_reason"], r
    assert rows["broken"]["status"] == "rejected" and rows["broken"]["in_domain"] == ""

    only = tmp_path / "in.csv"
    done = runner.invoke(app, ["results", str(job_id), "--out", str(only), "--in-domain-only"])
    assert done.exit_code == 0, done.output
    assert sorted(r["record_name"] for r in csv.DictReader(only.open())) == sorted(IN)

    parquet = tmp_path / "all.parquet"
    assert runner.invoke(app, ["results", str(job_id), "--out", str(parquet)]).exit_code == 0
    schema = pq.read_schema(parquet)
    assert schema.field("in_domain").type == pa.bool_()
    assert schema.field("domain_reason").type == pa.string()
    assert all(schema.field(c).type == pa.float64() for c in COLUMNS[:4])

    with api.client("read") as reader:
        url = f"/api/v1/jobs/{job_id}/results"
        got = reader.get(url, params={"format": "csv"})
        assert got.status_code == 200 and got.content == out_csv.read_bytes()
        nd = reader.get(url, params={"format": "ndjson", "in_domain_only": "true"})
        served = [json.loads(line) for line in nd.text.splitlines()]
        assert sorted(r["record_name"] for r in served) == sorted(IN)
        assert all(r["in_domain"] is True and r["domain_reason"] == "" for r in served)
        table = pq.read_table(io.BytesIO(reader.get(url, params={"format": "parquet"}).content))
        names, inside = table["record_name"].to_pylist(), table["in_domain"].to_pylist()
        flags = dict(zip(names, inside, strict=True))
        assert flags["cisplatin"] is False and flags["aspirin"] is True
        page = reader.get(f"/api/v1/jobs/{job_id}/report").text
    for _, reason in OUT.values():
        assert reason in page
    assert 'class="iv"' in page  # interval bars
    # The drawn molecules carry their atom contributions (similarity maps from the explainer).
    assert page.count('<img src="data:image/png;base64,') == 2 * min(len(IN) + len(OUT), 8)


def test_one_molecule_is_explained_atom_by_atom(api: Api, tmp_path: Path) -> None:
    runner = CliRunner()
    png = tmp_path / "octylphenol.png"
    shown = runner.invoke(app, ["explain", "Oc1ccccc1CCCCCCCC", "--out", str(png)])
    assert shown.exit_code == 0, shown.output
    assert "atom contributions" in shown.output and "in_domain" in shown.output
    assert png.read_bytes().startswith(b"\x89PNG")

    with api.client("read") as reader:
        got = reader.get("/api/v1/molecules/explain", params={"smiles": "Oc1ccccc1CCCCCCCC"})
        assert got.status_code == 200, got.text
        body = got.json()
        image = reader.get(
            "/api/v1/molecules/explain", params={"smiles": "[Na+].[Cl-]", "format": "png"}
        )
        bad = reader.get("/api/v1/molecules/explain", params={"smiles": "C1CC("})
    assert body["smiles"] == "CCCCCCCCc1ccccc1O" and body["in_domain"] is True
    assert body["logS_lower"] < body["logS"] < body["logS_upper"] and body["logS_std"] > 0
    atoms = body["atoms"]
    assert [a["symbol"] for a in atoms] == ["C"] * 14 + ["O"]
    oxygen = atoms[-1]["contribution"]
    assert oxygen > 0 and oxygen > max(a["contribution"] for a in atoms[:8])  # OH vs the tail
    assert body["similarity_map"].startswith("data:image/png;base64,")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert bad.status_code == 422 and "not a valid molecule" in bad.json()["detail"]
