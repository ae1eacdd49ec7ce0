"""The console's pages over HTTP against the real server: a session for every page with data,
a strict Content-Security-Policy and nothing inline or from elsewhere, everything escaped, the
key image as PNG, live progress data."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from db.models import AuditEvent
from db.session import session_scope
from medbatch.api.console.session import safe_next
from tests.helpers import unique_valid
from tests.medbatch.api.conftest import Api

PAGES = ["/", "/jobs", "/studies", "/extracts", "/failures", "/submit"]


@contextmanager
def _session(api: Api, scope: str) -> Iterator[httpx.Client]:
    """A client holding the console's session cookie, as a browser after signing in."""
    with httpx.Client(base_url=api.url, timeout=120, follow_redirects=False) as client:
        signed = client.post("/api/v1/session", json={"token": api.tokens[scope]})
        assert signed.status_code == 200, signed.text
        assert "httponly" in signed.headers["set-cookie"].lower()
        assert "samesite=strict" in signed.headers["set-cookie"].lower()
        yield client


@pytest.mark.server
def test_every_page_with_data_needs_a_session(api: Api) -> None:
    with httpx.Client(base_url=api.url, timeout=60, follow_redirects=False) as anonymous:
        for path in [*PAGES, "/jobs/1", "/jobs?state=done"]:
            answer = anonymous.get(path)
            assert answer.status_code == 303, (path, answer.text)
            assert answer.headers["location"].startswith("/sign-in?next=/"), answer.headers
        assert anonymous.get("/jobs?state=done").headers["location"] == (
            "/sign-in?next=/jobs%3Fstate%3Ddone"
        )
        assert anonymous.get("/sign-in").status_code == 200  # public, like the assets
        assert anonymous.get("/console/static/console.js").status_code == 200
        assert anonymous.get("/console/progress", params={"job": 1}).status_code == 401
        # a cookie holding a token that is not (or no longer) valid: redirected, then told why
        anonymous.cookies.set("medbatch_session", "mbt_unknown")
        assert anonymous.get("/jobs").status_code == 303
        told = anonymous.get("/sign-in", params={"next": "/jobs"})
        assert "not known" in told.text
        assert 'medbatch_session=""' in told.headers["set-cookie"]  # forgotten


def test_only_console_paths_are_followed_after_sign_in() -> None:
    assert safe_next("/jobs/3?x=1") == "/jobs/3?x=1"
    for elsewhere in ("//evil.example/", "https://evil.example/", "/\\evil.example", "", None):
        assert safe_next(elsewhere) == "/"


@pytest.mark.server
def test_pages_have_a_strict_policy_and_nothing_inline_or_from_elsewhere(api: Api) -> None:
    with _session(api, "admin") as admin:
        for path in PAGES:
            page = admin.get(path)
            assert page.status_code == 200, (path, page.text)
            csp = page.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
            assert "unsafe" not in csp and "frame-ancestors 'none'" in csp, csp
            assert page.headers["x-content-type-options"] == "nosniff"
            assert page.headers["cache-control"] == "no-store"
            assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), path  # no inline script
            assert "<style" not in page.text and " style=" not in page.text, path
            assert not re.search(r"\bon[a-z]+=", page.text), path  # no inline handlers
            assert not re.search(r"(src|href|action)=\"(https?:)?//", page.text), path


@pytest.mark.server
def test_what_a_file_brings_is_shown_escaped(api: Api, nci_smiles: list[tuple[str, str]]) -> None:
    name = "<img src=x onerror=alert(1)>.smi"
    rows = [f"{smi}\t{n}" for smi, n, _ in unique_valid(nci_smiles, 5, skip=3600)]
    text = "smiles\tname\n" + "\n".join(rows) + "\n<b>bold</b>\tx\n"
    with api.client("submit") as submitter:
        answer = submitter.post("/api/v1/libraries", files={"file": (name, text.encode())})
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
    with _session(api, "read") as reader:
        deadline = time.monotonic() + 300
        while reader.get(f"/api/v1/jobs/{job_id}").json()["state"] != "done":
            assert time.monotonic() < deadline, "the library was not scored in time"
            time.sleep(0.5)
        for path in ("/", "/jobs", f"/jobs/{job_id}"):
            page = reader.get(path).text
            assert "<img src=x" not in page, path
            assert "&lt;img src=x onerror=alert(1)&gt;.smi" in page, path
        failures = reader.get("/failures").text
        assert "<b>bold</b>" not in failures


@pytest.mark.server
def test_live_progress_answers_for_a_page_of_jobs(api: Api) -> None:
    with api.client("read") as reader:
        jobs = reader.get("/api/v1/jobs", params={"limit": 3}).json()["jobs"]
        ids = [j["id"] for j in jobs]
        got = reader.get("/console/progress", params=[("job", i) for i in [*ids, 999999]])
        assert got.status_code == 200
        body = got.json()
        assert set(body) == {str(i) for i in ids}  # an unknown id is left out
        for j in jobs:
            p, one = body[str(j["id"])], reader.get(f"/api/v1/jobs/{j['id']}").json()
            assert p["state"] == one["state"] or not p["terminal"]
            assert p["total"] == one["progress"]["children"] == j["progress"]["children"]
            if p["terminal"]:
                assert p["finished"] == p["total"]


@pytest.mark.server
def test_the_key_image_is_the_secondary_capture_as_png(api: Api, scored_study: str) -> None:
    with api.client("read") as reader:
        study = reader.get(f"/api/v1/studies/{scored_study}").json()
        assert study["links"]["key_image"].endswith("/key-image.png")
        got = reader.get(study["links"]["key_image"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        png = np.asarray(Image.open(io.BytesIO(got.content)))
        sc = pydicom.dcmread(api.settings.storage_dir / study["newest"]["sc_path"])
        assert png.shape == sc.pixel_array.shape and np.array_equal(png, sc.pixel_array)
        missing = reader.get(f"/api/v1/studies/{scored_study}/key-image.png?version=99")
        assert missing.status_code == 404 and "no key image" in missing.json()["detail"]
        unknown = reader.get("/api/v1/studies/1.2.3.4/key-image.png")
        assert unknown.status_code == 404 and "no study" in unknown.json()["detail"]
    with api.client() as anonymous:
        assert anonymous.get(study["links"]["key_image"]).status_code == 401
    with session_scope(api.settings.database_url) as session:
        reads = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "studies.read", AuditEvent.actor == "token:test-read"
            )
        ).all()
        assert any((e.details or {}).get("key_image") for e in reads)
