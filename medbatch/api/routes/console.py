"""The operator console at ``/`` (``medbatch.api.console``: pages, templates and assets that
ship in the package)."""

from __future__ import annotations

from medbatch.api.console import mount

__all__ = ["mount"]
