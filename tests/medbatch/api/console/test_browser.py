"""The operator console in Debian's chromium against the real server and stack: sign in (and a
bad token refused), submit a library and an extract from the Submit page and watch them reach
``done`` without reloading, open the reports, see a study's key image, retry a failed job as
an admin, and a read token that sees no Retry button and is refused. Each main page is
screenshotted into the test's tmp dir; no page may log a script error or a Content-Security-
Policy violation, nor load anything from another origin."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from medbatch.synth.ehr import write_long_csv
from tests.helpers import unique_valid
from tests.medbatch.api.conftest import Api, failed_chunk
from tests.medbatch.api.console.conftest import Browser, sign_in

pytestmark = [pytest.mark.server]

TERMINAL = {"done", "failed", "rejected", "not_applicable"}


def _only_this_origin(browser: Browser, api: Api) -> None:
    strangers = [u for u in browser.requests if not u.startswith((api.url, "data:", "blob:"))]
    assert not strangers, strangers
    assert not browser.errors, browser.errors  # script errors and CSP violations


def _watch(page: Page, timeout: float = 300) -> list[tuple[str, str]]:
    """What the job page's live progress showed, until the job ended (the page is never
    reloaded here: its script updates it)."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = page.locator(".live.big")
        try:
            state = live.get_attribute("data-state", timeout=5000) or ""
            count = live.locator(".count").text_content(timeout=5000) or ""
        except Exception:  # the page is being reloaded with the final counts
            continue
        if not seen or seen[-1] != (state, count):
            seen.append((state, count))
        if state in TERMINAL:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"the job page showed no end in {timeout} s: {seen}")


def test_sign_in_is_refused_with_a_bad_token(api: Api, browser: Browser) -> None:
    page = browser.page()
    page.goto(api.url + "/failures")
    page.wait_for_url(re.compile(r"/sign-in\?next=/failures$"))
    page.fill("#token", "mbt_not-a-token")
    page.click("#sign-in button[type=submit]")
    message = page.locator("#sign-in [data-message]")
    expect(message).to_contain_text("not known")
    expect(message).to_have_class(re.compile("error"))
    browser.shot(page, "sign-in-refused")
    assert page.url.startswith(api.url + "/sign-in")
    assert not [c for c in browser.context.cookies() if c["name"] == "medbatch_session"]
    page.goto(api.url + "/jobs")  # still signed out
    page.wait_for_url(re.compile(r"/sign-in\?next=/jobs$"))
    assert [e for e in browser.errors if "401" in e]  # the refused sign-in, nothing else
    browser.errors.clear()
    _only_this_origin(browser, api)


def test_an_operator_submits_a_library_watches_it_finish_and_opens_its_report(
    api: Api, browser: Browser, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    rows = [f"{smi}\t{name}" for smi, name, _ in unique_valid(nci_smiles, 200, skip=3000)]
    library = "smiles\tname\n" + "\n".join([*rows, "C1CC(\tbroken", rows[0] + "-again"]) + "\n"
    page = sign_in(browser, api, "submit")
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator(".tile[data-component=triton]")).to_contain_text("answering")
    browser.shot(page, "overview")

    page.click("nav >> text=Submit")
    page.wait_for_url(api.url + "/submit")
    form = page.locator("#library-form")
    form.locator("input[type=file]").set_input_files(
        {"name": "console.smi", "mimeType": "text/plain", "buffer": library.encode()}
    )
    form.locator("input[name=chunk_size]").fill("2")  # 100 chunks: seconds of progress
    browser.shot(page, "submit")
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])

    seen = _watch(page)
    assert seen[0][0] not in TERMINAL, seen  # it was shown on its way, then
    assert seen[-1][0] == "done", seen  # reached done by the page's own polling
    finished = [int(c.split(" / ")[0].replace(",", "")) for _, c in seen if " / " in c]
    assert finished == sorted(finished), seen  # progress only moves forward
    expect(page.locator("[data-scored]")).to_have_text("200")  # the reloaded, final counts
    chunks = page.locator("tr:has(th:text-is('chunks')) td").text_content()
    expect(page.locator(".live.big .count")).to_have_text(f"{chunks} / {chunks}")
    browser.shot(page, "job")

    with page.expect_popup() as popup:
        page.click("text=Open report")
    report = popup.value
    report.wait_for_load_state()
    assert report.url == f"{api.url}/api/v1/jobs/{job_id}/report"
    expect(report.locator("h1")).to_contain_text(f"Screening job {job_id}: console.smi")
    expect(report.locator("body")).to_contain_text("Predicted solubility of 200 scored molecules")
    expect(report.locator("body")).to_contain_text("Rejected rows (1)")
    browser.shot(report, "report")

    page.click("nav >> text=Jobs")
    row = page.locator(f"tr:has(a[href='/jobs/{job_id}'])")
    expect(row.locator(".state")).to_have_text("done")
    expect(row).to_contain_text("console.smi")
    browser.shot(page, "jobs")
    page.click("nav >> text=Overview")
    expect(page.locator(f"tr:has(a[href='/jobs/{job_id}']) .state")).to_have_text("done")
    browser.shot(page, "overview-with-jobs")
    _only_this_origin(browser, api)


def test_an_extract_is_submitted_and_listed_with_its_counts(
    api: Api, browser: Browser, tmp_path: Path
) -> None:
    extract = tmp_path / "console-extract.csv"
    stats = write_long_csv(extract, 30, seed=31, messiness=0.05)
    page = sign_in(browser, api, "submit", then="/submit")
    form = page.locator("#extract-form")
    form.locator("input[type=file]").set_input_files(str(extract))
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    assert _watch(page)[-1][0] == "done"
    expect(page.locator("[data-accepted]")).to_have_text(f"{stats.valid_rows:,}")
    expect(page.locator("[data-rejected]")).to_have_text(f"{stats.broken_rows:,}")

    page.click("nav >> text=EHR extracts")
    row = page.locator(f"tr[data-extract='{job_id}']")
    expect(row.locator("[data-accepted]")).to_have_text(f"{stats.valid_rows:,}")
    expect(row.locator("[data-rejected]")).to_have_text(f"{stats.broken_rows:,}")
    browser.shot(page, "extracts")
    with page.expect_popup() as popup:
        row.locator("text=report").click()
    report = popup.value
    report.wait_for_load_state()
    expect(report.locator("h1")).to_be_visible()
    browser.shot(report, "extract-report")
    _only_this_origin(browser, api)  # the report's own inline script ran under its CSP


def test_studies_show_their_newest_result_and_key_image(
    api: Api, browser: Browser, scored_study: str
) -> None:
    page = sign_in(browser, api, "read", then="/studies")
    row = page.locator(f"tr:has(span.uid[title='{scored_study}'])")
    image = row.locator(".key-image img")
    expect(image).to_be_visible()
    expect(image).to_have_js_property("complete", True)
    assert image.evaluate("img => img.naturalWidth") > 0  # a PNG the browser could draw
    expect(row).to_contain_text("%")
    browser.shot(page, "studies")
    _only_this_origin(browser, api)


def test_an_admin_retries_a_failed_job_from_the_failures_page(api: Api, browser: Browser) -> None:
    chunk_id = failed_chunk(api.settings, "console-retry")
    page = sign_in(browser, api, "admin", then="/failures")
    row = page.locator(f"tr[data-failed='{chunk_id}']")
    expect(row.locator(".reason")).to_have_text("Triton was down")
    browser.shot(page, "failures")
    row.locator("button[data-retry]").click()
    expect(page.locator("main [data-message]")).to_contain_text("1 job(s) queued again")
    page.goto(f"{api.url}/jobs/{chunk_id}")
    assert _watch(page)[-1][0] == "done"
    _only_this_origin(browser, api)


def test_a_read_token_sees_no_retry_button_and_may_not_retry(api: Api, browser: Browser) -> None:
    chunk_id = failed_chunk(api.settings, "console-read-only")
    page = sign_in(browser, api, "read", then="/failures")
    row = page.locator(f"tr[data-failed='{chunk_id}']")
    expect(row.locator(".reason")).to_have_text("Triton was down")
    expect(page.locator("button[data-retry]")).to_have_count(0)
    page.goto(f"{api.url}/jobs/{chunk_id}")
    expect(page.locator("button[data-retry]")).to_have_count(0)
    page.goto(f"{api.url}/submit")
    expect(page.locator("main [role=alert]")).to_contain_text("may read but not submit")
    expect(page.locator("form[data-upload]")).to_have_count(0)

    def post(path: str, console_header: bool) -> dict:
        script = """async ([url, header]) => {
            const r = await fetch(url, {method: "POST", credentials: "same-origin",
                                        headers: header ? {"X-Medbatch-Console": "1"} : {}});
            return {status: r.status, body: await r.json()};
        }"""
        return page.evaluate(script, [path, console_header])

    refused = post(f"/api/v1/jobs/{chunk_id}/retry", True)  # the session itself, by hand
    assert refused["status"] == 403 and "needs admin" in refused["body"]["detail"], refused
    forged = post(f"/api/v1/jobs/{chunk_id}/retry", False)  # as a form on another site would
    assert forged["status"] == 403 and "console" in forged["body"]["detail"], forged
    browser.errors.clear()  # the two refusals above are logged by the browser
    with api.client("read") as reader:
        assert reader.get(f"/api/v1/jobs/{chunk_id}").json()["state"] == "failed"
    _only_this_origin(browser, api)
