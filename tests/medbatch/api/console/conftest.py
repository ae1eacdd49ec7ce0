"""The console in a real browser: Debian's chromium (scripts/install.sh installs it) driven by
Playwright over the real API server and stack. Playwright's own browser downloads are never
used; each test gets a fresh profile."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from tests.dicom_data import make_series, storescu
from tests.helpers import wait_until
from tests.medbatch.api.conftest import Api

CHROMIUM = Path(os.environ.get("MEDBATCH_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.is_file():
        message = f"no browser at {CHROMIUM}: scripts/install.sh installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the console's browser tests")
        pytest.skip(message)
    with sync_playwright() as driver:
        yield driver


@dataclass
class Browser:
    """One fresh browser profile; every request it made, and every console error it logged
    (a script error or a Content-Security-Policy violation shows up there)."""

    context: BrowserContext
    shots: Path
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def page(self) -> Page:
        page = self.context.new_page()
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page

    def shot(self, page: Page, name: str) -> Path:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[Browser]:
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1440, "height": 900},  # a laptop screen
    )
    shots = tmp_path / "screenshots"
    shots.mkdir()
    b = Browser(context, shots)
    context.on("request", lambda r: b.requests.append(r.url))
    try:
        yield b
    finally:
        context.close()


def sign_in(browser: Browser, api: Api, scope: str, then: str = "/") -> Page:
    """Open ``then`` signed out (redirected to the sign-in page), sign in with the token of
    ``scope``, and land on ``then``."""
    page = browser.page()
    page.goto(api.url + then)
    page.wait_for_url(re.compile(r"/sign-in\?next="))
    page.fill("#token", api.tokens[scope])
    page.click("#sign-in button[type=submit]")
    page.wait_for_url(api.url + then)
    return page


@pytest.fixture(scope="session")
def scored_study(api: Api, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CT study pushed to the session's listener and scored: its Study Instance UID."""
    paths = make_series(tmp_path_factory.mktemp("console-ct"), 16)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(api.settings, paths)
    with api.client("read") as reader:

        def scored() -> bool:
            got = reader.get(f"/api/v1/studies/{study_uid}")
            return got.status_code == 200 and got.json()["newest"] is not None

        wait_until(scored, 300, "the pushed study to be scored", every=1.0)
    return study_uid
