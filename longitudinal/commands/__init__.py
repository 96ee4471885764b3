"""CLI command modules, one per area. Each defines ``register(app: typer.Typer) -> None``."""
