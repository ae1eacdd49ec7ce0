"""The browser-facing headers: a strict Content-Security-Policy for the console (its own scripts
and styles only, nothing inline, nothing from elsewhere) and one for the HTML reports, whose own
inline scripts are allowed by their hashes and nothing else runs."""

from __future__ import annotations

import base64
import hashlib
import re

#: The console's pages: scripts, styles, images and requests from this origin only; no inline
#: script or style attribute, no framing, forms post only here.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a page's URL may hold a Study Instance UID
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages hold results; nothing stays in a shared cache
}

_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.I)


def console_headers() -> dict[str, str]:
    return {"Content-Security-Policy": CONSOLE_CSP, **_COMMON}


def report_headers(page: str) -> dict[str, str]:
    """Headers for a report page: its inline scripts run (each allowed by its SHA-256, so a
    script smuggled in through data would not), its inline styles and SVG figures render, and
    it loads nothing from anywhere."""
    hashes = sorted(
        {
            "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
            for m in _INLINE_SCRIPT.findall(page)
        }
    )
    script = f"script-src {' '.join(hashes)}" if hashes else "script-src 'none'"
    csp = (
        f"default-src 'none'; {script}; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": csp, **_COMMON}
