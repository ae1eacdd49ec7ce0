"""The ``medbatch`` command: parse arguments, call a service (``medbatch.services``), render the
answer with rich. One module per command group; no query is written here."""

from __future__ import annotations

from importlib import import_module

from medbatch.cli.app import app

# Each module registers its commands on import; ``--help`` lists the groups in this order.
for _group in ("stack", "screening", "ehr", "pacs", "jobs", "admin"):
    import_module(f"medbatch.cli.{_group}")

__all__ = ["app"]
