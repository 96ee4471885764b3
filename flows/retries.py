"""Retry policy shared by the flows: I/O failures are retried, validation and query errors never are."""

from __future__ import annotations

from typing import Any


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only I/O failures (OSError and subclasses); anything else is final."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is not worth a retry
        return False
    return isinstance(exc, OSError)
