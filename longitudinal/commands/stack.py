"""CLI commands for the 'stack' area: the local Prefect + MLflow stack, deployments, and `serve`."""

from __future__ import annotations

from pathlib import Path

import typer

from longitudinal.commands._common import console, err_console, fail, print_locations, settings_of

stack_app = typer.Typer(
    help="Local Prefect server + workers + MLflow server on loopback.", no_args_is_help=True
)


@stack_app.command("up")
def up(
    ctx: typer.Context,
    prefect_port: int | None = typer.Option(None, help="Prefect API port (0 = any free port; default 4200)."),
    mlflow_port: int | None = typer.Option(
        None, help="MLflow server port (0 = any free port; default 5000)."
    ),
    worker_port: int | None = typer.Option(
        None, help="First worker health-check port (0 = free ports; default 8765)."
    ),
    prefect_db: str | None = typer.Option(
        None, help="Prefect database URL, e.g. postgresql+asyncpg://u:p@127.0.0.1/prefect (default sqlite)."
    ),
    mlflow_db: str | None = typer.Option(
        None, help="MLflow backend store URI, e.g. postgresql://u:p@127.0.0.1/mlflow (default sqlite)."
    ),
    gpu_worker: bool = typer.Option(False, help="Also start a worker for the gpu pool on this machine."),
    ui: bool = typer.Option(True, help="Serve the Prefect dashboard."),
) -> None:
    """Start the stack, wait until every service is healthy, print URLs and the export line."""
    from longitudinal.stack.config import redact_url, resolve_config
    from longitudinal.stack.local import stack_up
    from longitudinal.stack.process import StackError

    settings = settings_of(ctx)
    try:
        cfg = resolve_config(
            settings,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            worker_health_port=worker_port,
            prefect_database_url=prefect_db,
            mlflow_backend_uri=mlflow_db,
            worker_pools=("cpu", "gpu") if gpu_worker else ("cpu",),
            prefect_ui=ui,
        )
        state = stack_up(cfg)
    except StackError as exc:
        fail(str(exc))
    print_locations(settings, ("home", "store"))
    for svc in state.services.values():
        console.print(f"[green]up[/green] {svc.name:<15} pid {svc.pid:<8} {svc.url}  (log {svc.log})", soft_wrap=True)
    console.print(f"prefect database: {redact_url(cfg.prefect_database_url)}", soft_wrap=True)
    console.print(f"mlflow backend:   {redact_url(cfg.mlflow_backend_uri)}", soft_wrap=True)
    console.print(f"mlflow artifacts: {cfg.mlflow_artifacts_destination}", soft_wrap=True)
    print(state.exports())


@stack_app.command("down")
def down(ctx: typer.Context) -> None:
    """Stop every process group the stack started and check that no port is left open.

    Only processes that still have the start time, boot and command line recorded by `up` are signalled; a
    pid now held by another process is left alone and its record cleared, with a warning. Exits 1 when
    something that should be down may still run (a survivor, an open port, a pid that cannot be verified).
    """
    from rich.markup import escape

    from longitudinal.stack.local import stack_down

    stack_dir = settings_of(ctx).home_dir / "stack"
    report = stack_down(stack_dir)
    if report is None:
        console.print(f"no stack recorded under {stack_dir}", soft_wrap=True)
        return
    for warning in report.warnings:
        # Messages quote command lines, which may hold brackets rich would read as markup.
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    if report.already_gone:
        console.print(f"already exited: {', '.join(report.already_gone)}")
    console.print(f"stopped: {', '.join(report.stopped) or 'nothing'}")
    if report.problems:
        # Unwrapped, so the `kill` lines in the messages can be copied whole.
        err_console.print("[bold red]error:[/bold red] stack did not stop cleanly:")
        for problem in report.problems:
            err_console.print(f"- {escape(problem)}", soft_wrap=True)
        raise typer.Exit(1)


@stack_app.command("status")
def status(ctx: typer.Context) -> None:
    """One line per service: pid alive, HTTP health, port open. Exits 1 when any service is down."""
    from rich.markup import escape

    from longitudinal.stack.local import read_state, stack_status

    stack_dir = settings_of(ctx).home_dir / "stack"
    rows = stack_status(stack_dir)
    if not rows:
        fail(f"no stack recorded under {stack_dir}")
    for r in rows:
        ok = r.alive and r.healthy and r.port_open
        mark = "[green]ok[/green]  " if ok else "[red]DOWN[/red]"
        console.print(
            f"{mark} {r.name:<15} pid {r.pid:<8} alive={r.alive} healthy={r.healthy} port_open={r.port_open} {r.url}"
        )
        if r.note:
            console.print(f"     {escape(r.note)}", soft_wrap=True)
    state = read_state(stack_dir)
    if state is not None:
        print(state.exports())
    if not all(r.alive and r.healthy and r.port_open for r in rows):
        raise typer.Exit(1)


@stack_app.command("env")
def env(ctx: typer.Context) -> None:
    """Print the export line of the running stack (use: eval "$(longitudinal stack env)")."""
    from longitudinal.stack.local import read_state

    state = read_state(settings_of(ctx).home_dir / "stack")
    if state is None:
        fail("no stack recorded; run `longitudinal stack up`")
    print(state.exports())


@stack_app.command("deploy")
def deploy(
    ctx: typer.Context,
    prefect_file: Path | None = typer.Option(None, help="Default: deploy/prefect.yaml of this checkout."),
    api_url: str | None = typer.Option(None, help="Prefect API URL (default: the running stack's)."),
    name: list[str] = typer.Option([], help="Deploy only these deployments (repeatable; default: all)."),
) -> None:
    """Register the deployments of prefect.yaml with the server (prefect deploy --all, or --name ...)."""
    from longitudinal.stack.local import read_state
    from longitudinal.stack.prefect_file import deploy_all
    from longitudinal.stack.process import StackError

    settings = settings_of(ctx)
    state = read_state(settings.home_dir / "stack")
    url = api_url or settings.prefect_url or (state.prefect_api_url if state else None)
    try:
        result = deploy_all(settings, prefect_file=prefect_file, api_url=url, names=name)
    except StackError as exc:
        fail(str(exc))
    for name in result.deployments:
        console.print(f"[green]deployed[/green] {name}")


def register(app: typer.Typer) -> None:
    """Add `stack up|down|status|env|deploy` and `serve` to the root app."""
    app.add_typer(stack_app, name="stack")

    @app.command("serve")
    def serve(
        ctx: typer.Context,
        prefect_file: Path | None = typer.Option(None, help="Default: deploy/prefect.yaml of this checkout."),
        deployment: list[str] = typer.Option([], help="Serve only these deployments (repeatable)."),
        limit: int | None = typer.Option(None, help="Most flow runs executed at once."),
    ) -> None:
        """Serve the prefect.yaml deployments with their schedules from this one process (no worker).

        Needs a Prefect server: PREFECT_API_URL, or a stack started with `longitudinal stack up`.
        """
        import os

        from longitudinal.stack.local import read_state
        from longitudinal.stack.serve import serve_command

        settings = settings_of(ctx)
        state = read_state(settings.home_dir / "stack")
        try:
            argv, env = serve_command(
                settings,
                prefect_file=prefect_file,
                deployments=deployment,
                limit=limit,
                api_url=state.prefect_api_url if state else None,
            )
        except ValueError as exc:
            fail(str(exc))
        console.print(f"serving with PREFECT_API_URL={env['PREFECT_API_URL']}: {' '.join(argv[1:])}")
        os.execve(argv[0], argv, env)
