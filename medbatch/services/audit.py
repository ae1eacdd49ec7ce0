"""The audit chain's integrity, as ``medbatch audit verify`` and the API report it."""

from __future__ import annotations

from core.settings import Settings
from db import audit
from db.session import session_scope


def verify_audit(settings: Settings) -> audit.ChainReport:
    """Walk the hash chain from the first event; the report names the first broken link."""
    with session_scope(settings.database_url) as session:
        return audit.verify_chain(session)


def record_refusal(
    settings: Settings, *, actor: str, subject: str, status: int, reason: str
) -> None:
    """A refused request (no token, wrong scope, bad input) as an event of the chain."""
    with session_scope(settings.database_url) as session:
        audit.append(
            session,
            actor=actor,
            action="api.refused",
            subject=subject,
            details={"status": status, "reason": reason[:500]},
        )
