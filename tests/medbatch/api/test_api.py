"""The HTTP API against the real server and stack: tokens and scopes, submissions, polling,
results in three formats, reports, retries, studies, health; and every bad request answered
with a clear problem, an audit event and nothing half-stored."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from core.job_kinds import JobKind
from db.models import AuditEvent
from db.session import session_scope
from medbatch.cli import app
from medbatch.services.results import export_results
from medbatch.synth.ehr import write_long_csv
from tests.helpers import unique_valid
from tests.medbatch.api.conftest import UPLOAD_LIMIT, Api, failed_chunk

pytestmark = [pytest.mark.server]


def _problem(response: httpx.Response, status: int, match: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and match in body["detail"], body
    return body


def _audited(api: Api, action: str, actor_prefix: str) -> list[AuditEvent]:
    with session_scope(api.settings.database_url) as session:
        return list(
            session.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == action, AuditEvent.actor.startswith(actor_prefix)
                )
            )
        )


def _wait_done(client: httpx.Client, job_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] not in ("received", "queued", "running"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished in {timeout} s")


def _library(nci: list[tuple[str, str]], n: int, skip: int) -> str:
    rows = [f"{smi}\t{name}" for smi, name, _ in unique_valid(nci, n, skip=skip)]
    return "smiles\tname\n" + "\n".join([*rows, "C1CC(\tbroken", rows[0] + "-again"]) + "\n"


# --- tokens and scopes ---------------------------------------------------------------------------
def test_only_healthz_answers_without_a_token(api: Api) -> None:
    with api.client() as anonymous:
        alive = anonymous.get("/healthz")
        assert alive.status_code == 200 and alive.json()["status"] == "alive"
        for path in ("/api/v1/jobs", "/readyz", "/metrics", "/api/v1/studies", "/openapi.json"):
            response = anonymous.get(path)
            body = _problem(response, 401, "no bearer token")
            assert "medbatch token create" in body["detail"]
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert _audited(api, "api.refused", "anonymous@")


def test_wrong_revoked_and_underscoped_tokens_are_refused(api: Api, tmp_path: Path) -> None:
    with api.client() as c:
        _problem(
            c.get("/api/v1/jobs", headers={"Authorization": "Bearer mbt_nope"}), 401, "not known"
        )
        _problem(c.get("/api/v1/jobs", headers={"Authorization": "Basic dTpw"}), 401, "Bearer")
    with api.client("read") as reader:
        assert reader.get("/api/v1/jobs").status_code == 200
        lib = {"file": ("x.smi", b"CCO\n")}
        _problem(reader.post("/api/v1/libraries", files=lib), 403, "needs submit")
    with api.client("submit") as submitter:
        _problem(submitter.post("/api/v1/jobs/1/retry"), 403, "needs admin")
    assert _audited(api, "api.refused", "token:test-read")

    # a token made and revoked with the CLI: the token alone on the last line, then 401
    runner = CliRunner(env={"MEDBATCH_DATABASE_URL": api.settings.database_url})
    made = runner.invoke(app, ["token", "create", "etl-nightly", "--scope", "submit,read"])
    assert made.exit_code == 0, made.output
    token = made.output.strip().splitlines()[-1]
    assert token.startswith("mbt_") and " " not in token
    with api.client() as c:
        me = c.get("/api/v1/session", headers={"Authorization": f"Bearer {token}"})
        assert me.json() == {"name": "etl-nightly", "scopes": ["read", "submit"]}
        listed = runner.invoke(app, ["token", "list"])
        assert "etl-nightly" in listed.output and token not in listed.output
        assert runner.invoke(app, ["token", "revoke", "etl-nightly"]).exit_code == 0
        again = c.get("/api/v1/session", headers={"Authorization": f"Bearer {token}"})
        _problem(again, 401, "revoked")


# --- a library: submit, poll, fetch -------------------------------------------------------------
def test_a_library_is_submitted_polled_and_fetched(
    api: Api, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    text = _library(nci_smiles, 30, skip=2600)  # NCI rows no other test scores
    with api.client("submit") as submitter:
        answer = submitter.post(
            "/api/v1/libraries",
            files={"file": ("night.smi", text.encode())},
            data={"chunk_size": "8"},
        )
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
        assert answer.headers["location"] == f"/api/v1/jobs/{job_id}"
        job = _wait_done(submitter, job_id)
    assert job["state"] == "done" and job["kind"] == JobKind.CHEM_SCREEN.value
    assert job["summary"]["rejected"] == 1 and job["summary"]["duplicates"] == 1
    assert job["progress"]["children"] == job["progress"]["finished"] == 4

    cli_csv = tmp_path / "cli.csv"
    export_results(api.settings, job_id, cli_csv, actor="test")
    with api.client("read") as reader:
        got = reader.get(f"/api/v1/jobs/{job_id}/results", params={"format": "csv"})
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
        assert got.content == cli_csv.read_bytes()  # the same rows and columns as the CLI's
        rows = list(csv.DictReader(io.StringIO(got.text)))
        parquet = reader.get(f"/api/v1/jobs/{job_id}/results", params={"format": "parquet"})
        table = pq.read_table(io.BytesIO(parquet.content))
        assert table.num_rows == len(rows) and table.column_names == list(rows[0])
        ndjson = reader.get(f"/api/v1/jobs/{job_id}/results", params={"format": "ndjson"})
        lines = [json.loads(line) for line in ndjson.text.splitlines()]
        assert [r["line_no"] for r in lines] == [int(r["line_no"]) for r in rows]
        assert sum(r["status"] == "scored" for r in lines) == 30
        report = reader.get(f"/api/v1/jobs/{job_id}/report")
        assert report.status_code == 200 and "logS" in report.text
        listed = reader.get("/api/v1/jobs", params={"kind": "chem_screen", "limit": 1}).json()
        assert listed["jobs"][0]["id"] == job_id and "before=" in listed["next"]
        _problem(reader.get("/api/v1/jobs/999999"), 404, "no job 999999")
        _problem(reader.get("/api/v1/jobs/1/results", params={"format": "xlsx"}), 422, "format")
    assert _audited(api, "results.export", "token:test-read")


def test_the_same_file_gives_the_same_job_also_when_posted_twice_at_once(
    api: Api, nci_smiles: list[tuple[str, str]]
) -> None:
    text = _library(nci_smiles, 12, skip=2800).encode()
    answers: list[httpx.Response] = []

    def post() -> None:
        with api.client("submit") as c:
            answers.append(c.post("/api/v1/libraries", files={"file": ("twice.smi", text)}))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) in ([200, 201], [201, 200])
    assert answers[0].json()["id"] == answers[1].json()["id"]
    with api.client("submit") as c:
        third = c.post("/api/v1/libraries", files={"file": ("renamed.smi", text)})
    assert third.status_code == 200 and third.json()["id"] == answers[0].json()["id"]


# --- an EHR extract ------------------------------------------------------------------------------
def test_an_ehr_extract_is_submitted_and_its_results_fetched(api: Api, tmp_path: Path) -> None:
    extract = tmp_path / "night.csv"
    stats = write_long_csv(extract, 40, seed=23, messiness=0.05)
    with api.client("submit") as c:
        answer = c.post("/api/v1/ehr/extracts", files={"file": ("night.csv", extract.read_bytes())})
        assert answer.status_code == 201, answer.text
        job = _wait_done(c, answer.json()["id"])
        assert job["state"] == "done", job
        got = c.get(f"/api/v1/jobs/{job['id']}/results", params={"format": "ndjson"})
    rows = [json.loads(line) for line in got.text.splitlines()]
    assert sum(r["status"] == "rejected" for r in rows) == stats.broken_rows
    scored = [r for r in rows if r["status"] == "scored"]
    assert scored and all(0 <= r["diabetes_risk"] <= 1 for r in scored)
    with api.client("submit") as c:
        not_extract = c.post("/api/v1/ehr/extracts", files={"file": ("x.csv", b"a,b\n1,2\n")})
    body = _problem(not_extract, 422, "not an EHR extract")
    assert body["job_id"]  # the rejection is recorded as a job


def test_a_zipped_fhir_export_is_an_extract_too(api: Api, tmp_path: Path) -> None:
    import io
    import zipfile

    from medbatch.synth.ehr_fhir import write_fhir_export

    stats = write_fhir_export(tmp_path / "bulk", 30, seed=29, messiness=0.05)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(stats.path.iterdir()):
            zf.write(p, f"bulk/{p.name}")
    with api.client("submit") as c:
        answer = c.post("/api/v1/ehr/extracts", files={"file": ("bulk.zip", buffer.getvalue())})
        assert answer.status_code == 201, answer.text
        job = _wait_done(c, answer.json()["id"])
        assert job["state"] == "done", job
        got = c.get(f"/api/v1/jobs/{job['id']}/results", params={"format": "ndjson"})
    rows = [json.loads(line) for line in got.text.splitlines()]
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == stats.broken_rows
    assert all(r["reason"].startswith("bulk/Observation-0001.ndjson, line ") for r in rejected)


# --- retry ---------------------------------------------------------------------------------------
def test_admin_retries_a_failed_chunk(api: Api, nci_smiles: list[tuple[str, str]]) -> None:
    chunk_id = failed_chunk(api.settings, "retry-test")
    with api.client("admin") as admin:
        answer = admin.post(f"/api/v1/jobs/{chunk_id}/retry")
        assert answer.status_code == 200 and answer.json()["requeued"] == [chunk_id]
        assert _wait_done(admin, chunk_id)["state"] == "done"


# --- bad requests --------------------------------------------------------------------------------
def _raw_post(api: Api, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
    """A request written by hand on a socket (a body cut short cannot be sent with httpx)."""
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def test_bad_uploads_get_clear_errors_and_leave_nothing(api: Api) -> None:
    uploads = api.settings.upload_dir

    def stored() -> set[str]:
        return {p.name for p in uploads.rglob("*") if p.is_file()} if uploads.exists() else set()

    before = stored()
    with api.client("submit") as c:
        _problem(c.post("/api/v1/libraries", json={"smiles": "CCO"}), 415, "multipart/form-data")
        big = {"file": ("big.smi", b"C" * (UPLOAD_LIMIT + 10))}
        _problem(c.post("/api/v1/libraries", files=big), 413, "limit")
        _problem(
            c.post("/api/v1/libraries", files={"file": ("../../etc/evil.smi", b"CCO\n")}),
            400,
            "plain file name",
        )
        no_file = {"force": (None, "true")}
        _problem(c.post("/api/v1/libraries", files=no_file), 400, "no 'file' part")
        png = {"file": ("library.smi", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)}
        _problem(c.post("/api/v1/libraries", files=png), 422, "PNG image")
        _problem(
            c.post("/api/v1/libraries", files={"file": ("x.smi", b"CCO\n")}, data={"x": "1"}),
            422,
            "unknown form field",
        )
    boundary = "medbatchtest"
    cut = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.smi"\r\n'
        "Content-Type: application/octet-stream\r\n\r\nCCO\nCCN\n"
    ).encode()
    status, body = _raw_post(
        api,
        "/api/v1/libraries",
        {
            "Authorization": f"Bearer {api.tokens['submit']}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(cut)),
        },
        cut,
    )
    assert status == 400 and "truncated" in body["detail"], body
    # nothing half-stored: no new upload (the PNG was refused after it was stored whole, and is
    # kept with its rejected job; the others never reached disk)
    new = stored() - before
    assert new <= {"library.smi"}, new
    assert not list((uploads / "tmp").glob("*")) if (uploads / "tmp").exists() else True
    statuses = {e.details["status"] for e in _audited(api, "api.refused", "token:test-submit")}
    assert {400, 413, 415, 422} <= statuses


def test_health_metrics_audit_and_studies(api: Api) -> None:
    with api.client("read") as reader:
        ready = reader.get("/readyz")
        body = ready.json()
        names = {c["name"]: c for c in body["components"]}
        assert names["database"]["ok"] and names["redis"]["ok"] and names["triton"]["ok"]
        assert names["listener"]["ok"]  # the session stack runs one
        assert ready.status_code == 200 and body["ready"], body
        assert set(body["queues"]) >= {"chem", "dicom", "ehr"}
        assert body["workers"] and names[body["workers"][0]]["ok"]  # each worker by its node
        # no `medbatch up` supervises the session's stack: nothing recorded to merge in
        assert body["supervision"]["supervision"] == "none"
        assert names["triton"]["restarts"] == 0 and names["triton"]["managed"] is None
        metrics = reader.get("/metrics")
        assert "medbatch_api_requests_total" in metrics.text
        assert 'route="/readyz"' in metrics.text
        schema = reader.get("/openapi.json").json()
        assert {
            "/api/v1/libraries",
            "/api/v1/ehr/extracts",
            "/api/v1/jobs/{job_id}/results",
        } <= set(schema["paths"])
        verify = reader.get("/api/v1/audit/verify").json()
        assert verify["ok"] and verify["events"] > 0
        studies = reader.get("/api/v1/studies").json()
        assert isinstance(studies["studies"], list)
        _problem(reader.get("/api/v1/studies/1.2.3.4"), 404, "no study")
