"""Start, stop and inspect the local Prefect + MLflow stack.

Servers are driven as subprocesses and checked over HTTP; this package imports neither prefect nor mlflow.

- ``config``   ``StackSettings`` (env), ``StackConfig`` (resolved ports/URLs/locations), ``resolve_config``
- ``process``  detached process groups and their identities (start time, boot, cmdline), HTTP health,
               group shutdown of verified processes only
- ``local``    ``stack_up`` / ``stack_down`` / ``stack_status`` and the recorded ``StackState``
- ``serve``    ``serve_command``: the argv of the single-process ``python -m flows.serve`` alternative
"""
