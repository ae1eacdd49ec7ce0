"""Who is asking, as the audit chain records it: the user at a terminal, or an API token."""

from __future__ import annotations

from db.audit import current_actor


def terminal_user() -> str:
    """``user:<login>@<host>``: the person running a ``medbatch`` command."""
    return current_actor("user")
