"""The ``medbatch`` Typer application and its command groups (commands register on import)."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True, help="medbatch: batch inference for PACS, EHR and compound libraries."
)
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
token_app = typer.Typer(no_args_is_help=True, help="Bearer tokens of the HTTP API.")
app.add_typer(audit_app, name="audit", rich_help_panel="Administration")
app.add_typer(db_app, name="db", rich_help_panel="Administration")
app.add_typer(token_app, name="token", rich_help_panel="Administration")
