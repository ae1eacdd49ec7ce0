"""API tokens: created, listed and revoked by an operator; checked on every HTTP request.

A token is 256 random bits shown once; the database keeps its SHA-256 only. Scopes nest:
``read`` reads, ``submit`` also submits, ``admin`` also retries and manages tokens.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from core.errors import AuthenticationError, InputError, NotFoundError
from core.settings import Settings
from db import audit
from db.models import ApiToken, utcnow
from db.session import session_scope

TOKEN_PREFIX = "mbt_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: last_used_at is written at most this often per token (not a write per request).
_TOUCH_EVERY_S = 60.0
_touched: dict[str, float] = {}


class Scope(enum.StrEnum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


_RANK = {Scope.READ: 0, Scope.SUBMIT: 1, Scope.ADMIN: 2}


def parse_scopes(text: str) -> frozenset[Scope]:
    """``"submit,read"`` → the scopes; an unknown word is an :class:`InputError`."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    unknown = [w for w in words if w not in Scope._value2member_map_]
    if unknown or not words:
        raise InputError(
            f"unknown scope {', '.join(unknown) or '(none given)'}: use read, submit or admin, "
            "comma-separated (submit includes read, admin includes both)"
        )
    return frozenset(Scope(w) for w in words)


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scopes: frozenset[Scope]
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def actor(self) -> str:
        """How the audit chain names requests made with this token."""
        return f"token:{self.name}"

    def allows(self, scope: Scope) -> bool:
        return max(_RANK[s] for s in self.scopes) >= _RANK[scope]

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(
            row.name,
            parse_scopes(row.scopes),
            row.created_at,
            row.created_by,
            row.revoked_at,
            row.last_used_at,
        )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    settings: Settings, name: str, scopes: frozenset[Scope], *, actor: str
) -> tuple[TokenInfo, str]:
    """A new token named ``name``: its record, and the token itself (shown only now)."""
    if not _NAME.match(name):
        raise InputError(
            f"token name {name!r}: use letters, digits, '.', '_' or '-' (up to 64 characters)"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(settings.database_url) as session:
        row = ApiToken(
            name=name,
            token_sha256=_digest(token),
            scopes=",".join(s.value for s in sorted(scopes, key=_RANK.__getitem__)),
            created_by=actor,
        )
        session.add(row)
        try:
            session.flush()
        except IntegrityError as exc:
            raise InputError(
                f"a token named {name!r} exists already; revoke it or choose another name"
            ) from exc
        audit.append(
            session,
            actor=actor,
            action="token.created",
            subject=f"token:{name}",
            details={"scopes": row.scopes},
        )
        return TokenInfo.of(row), token


def list_tokens(settings: Settings) -> list[TokenInfo]:
    with session_scope(settings.database_url) as session:
        return [TokenInfo.of(r) for r in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(settings: Settings, name: str, *, actor: str) -> TokenInfo:
    """Revoke ``name`` (it is kept, marked revoked, so the audit chain still names it)."""
    with session_scope(settings.database_url) as session:
        row = session.scalars(select(ApiToken).where(ApiToken.name == name)).first()
        if row is None:
            raise NotFoundError(f"no token named {name!r}; `medbatch token list` shows them")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            audit.append(session, actor=actor, action="token.revoked", subject=f"token:{name}")
        return TokenInfo.of(row)


def authenticate(settings: Settings, token: str) -> TokenInfo:
    """The token's record, or :class:`AuthenticationError` saying what is wrong with it."""
    with session_scope(settings.database_url) as session:
        row = session.scalars(
            select(ApiToken).where(ApiToken.token_sha256 == _digest(token))
        ).first()
        if row is None:
            raise AuthenticationError(
                "the bearer token is not known here; create one with `medbatch token create`"
            )
        if row.revoked_at is not None:
            raise AuthenticationError(
                f"the token {row.name!r} was revoked on {row.revoked_at:%Y-%m-%d %H:%M} UTC; "
                "ask an administrator for a new one"
            )
        now = time.monotonic()
        if now - _touched.get(row.name, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
            _touched[row.name] = now
            session.execute(
                update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=utcnow())
            )
        return TokenInfo.of(row)
