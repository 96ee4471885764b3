"""CLI commands for the 'models' area: the model registry (versions, aliases, gate decisions)."""

from __future__ import annotations

import typer

from longitudinal.commands._common import console, fail, print_locations, settings_of

models_app = typer.Typer(help="Registered forecaster versions, aliases and promotion decisions.",
                         no_args_is_help=True)


@models_app.command("list")
def list_cmd(
    ctx: typer.Context,
    name: str | None = typer.Option(None, "--name", help="Registered model name (default tumor-growth-forecaster)."),
) -> None:
    """Versions (newest first) with aliases, model kind, gate decision, validation figures and what their volume
    intervals rest on."""
    from rich.table import Table

    from longitudinal.tracking.registry import list_versions

    settings = settings_of(ctx)
    print_locations(settings, ("mlflow",))
    rows = list_versions(settings, name)
    shown = name or settings.registered_model_name
    if not rows:
        console.print(f"no versions of {shown!r}")
        return
    table = Table(title=shown, title_justify="left")
    for col in ("version", "aliases", "kind", "gate", "val dice whole", "val vol err (ml)", "intervals", "run"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.version, ", ".join(r.aliases) or "-", r.kind, r.decision, r.val_dice_whole,
                      r.val_volume_error_ml, r.intervals, (r.run_id or "-")[:12])
    console.print(table)


@models_app.command("resolve")
def resolve_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION, models:/..., runs:/... or a checkpoint path."),
) -> None:
    """Download (if needed) and print the local checkpoint a model reference points to."""
    from rich.markup import escape

    from longitudinal.tracking.registry import resolve_model_ref

    settings = settings_of(ctx)
    try:
        resolved = resolve_model_ref(ref, settings)
    except ValueError as exc:
        fail(escape(str(exc)))  # the message lists forms like runs:/<id>[/<name>], not rich markup
    console.print_json(data=resolved.to_dict())


@models_app.command("register-closed-form")
def register_closed_form_cmd(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="A kind that needs no training: lci, linear or fk."),
    name: str | None = typer.Option(None, "--name", help="Registered model name (default tumor-growth-forecaster)."),
    alias: list[str] = typer.Option([], "--alias", help="Alias to set on the new version (repeatable)."),
) -> None:
    """Register a closed-form kind as a new model version (the same forecast as `forecast --model KIND`)."""
    from rich.markup import escape

    from longitudinal.tracking.logged_model import register_closed_form

    settings = settings_of(ctx)
    print_locations(settings, ("mlflow",))
    try:
        version, model_uri = register_closed_form(settings, kind, name, tuple(alias))
    except ValueError as exc:
        fail(escape(str(exc)))
    shown = name or settings.registered_model_name
    console.print(f"registered {kind} as {shown}/{version} ({model_uri})" + (f", aliases {', '.join(alias)}"
                                                                              if alias else ""))


def register(app: typer.Typer) -> None:
    """Add `longitudinal models ...` to the root app."""
    app.add_typer(models_app, name="models")
