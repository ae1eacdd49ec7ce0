"""The audit chain and the database schema."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from core.errors import MedbatchError
from medbatch.cli.app import audit_app, db_app, token_app
from medbatch.cli.common import console, fail, ok, out, settings, terminal_user


@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit hash chain; name the first broken link (exit 1 if broken)."""
    from medbatch.services.audit import verify_audit

    report = verify_audit(settings())
    if report.ok:
        out.print(f"[green]audit chain intact[/]: {report.events} events verified")
        return
    out.print(
        f"[bold red]audit chain broken at event {report.broken_seq}[/]: {report.reason} "
        f"({report.events} events verified before it)"
    )
    raise typer.Exit(code=1)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply Alembic migrations."""
    from medbatch.services.stack import migrate

    migrate(settings(), revision)
    out.print(f"database at {revision}")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what uses it (an ETL job, a viewer).")],
    scope: Annotated[
        str, typer.Option(help="read, submit (includes read) or admin (includes both).")
    ] = "read",
) -> None:
    """Create a token; the token is printed alone on the last line (shown only this once)."""
    from medbatch.services import tokens
    from medbatch.services.stack import migrate

    s = settings()
    try:
        migrate(s)
        info, token = tokens.create_token(
            s, name, tokens.parse_scopes(scope), actor=terminal_user()
        )
    except MedbatchError as exc:
        raise fail(exc) from exc
    ok(f"token {info.name!r} with scopes {', '.join(sorted(info.scopes))}; keep it secret:")
    print(token)


@token_app.command("list")
def token_list() -> None:
    """Every token: scopes, who created it and when, last use, revoked or not."""
    from medbatch.services import tokens

    table = Table("name", "scopes", "created", "by", "last used", "revoked")
    for t in tokens.list_tokens(settings()):
        table.add_row(
            t.name,
            ",".join(sorted(t.scopes)),
            f"{t.created_at:%Y-%m-%d %H:%M}",
            t.created_by,
            f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "-",
            f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token at once: requests carrying it get 401 from now on."""
    from medbatch.services import tokens

    try:
        tokens.revoke_token(settings(), name, actor=terminal_user())
    except MedbatchError as exc:
        raise fail(exc) from exc
    console.print(f"token {name!r} revoked")
