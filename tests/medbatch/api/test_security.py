"""The report's Content-Security-Policy lets exactly its own inline scripts run."""

from __future__ import annotations

import base64
import hashlib

from medbatch.api.security import CONSOLE_CSP, report_headers


def _hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def test_a_report_runs_its_own_inline_scripts_and_nothing_else() -> None:
    own = "\n(function () { draw(); })();\n"
    data = '<script type="application/json">{"a":1}</script>'
    page = f"<style>p{{}}</style>{data}<script>{own}</script>"
    csp = report_headers(page)["Content-Security-Policy"]
    assert _hash(own) in csp
    assert _hash("alert(1)") not in csp  # a script smuggled into the data would not run
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp.split("script-src", 1)[1].split(";", 1)[0]


def test_a_report_without_scripts_runs_none() -> None:
    csp = report_headers("<h1>report</h1><svg><style>.a{}</style></svg>")
    assert "script-src 'none'" in csp["Content-Security-Policy"]


def test_the_console_allows_only_its_own_files() -> None:
    assert "'self'" in CONSOLE_CSP and "unsafe" not in CONSOLE_CSP and "http" not in CONSOLE_CSP
