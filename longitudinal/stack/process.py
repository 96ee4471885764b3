"""Detached server processes: start in their own session, probe over HTTP, stop the whole group.

Each service runs in a new session (its pid is its process-group id), so ``stop`` can signal the server and
every child it forked (uvicorn workers, flow-run subprocesses) at once, even after the command that
started it has exited. Descendants that moved to a session of their own are found through /proc first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


class StackError(RuntimeError):
    """A stack operation failed; the message lists every problem."""


def start_detached(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> int:
    """Start ``argv`` in a new session with stdout+stderr appended to ``log_path``; return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def is_alive(pid: int) -> bool:
    """True while ``pid`` is a running process (a zombie, which holds no ports or memory, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # Field 3 of /proc/<pid>/stat is the state; the name in field 2 may contain spaces, so split after ')'.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (empty where /proc is unavailable)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop_group(pid: int, *, grace_s: float = 20.0) -> list[int]:
    """SIGTERM the process group led by ``pid`` and its stray descendants; SIGKILL what outlives ``grace_s``.

    Returns the pids still alive afterwards (empty on success).
    """
    targets = [pid, *descendants(pid)]
    groups = {pid}
    for p in targets:
        try:
            groups.add(os.getpgid(p))
        except OSError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except OSError:
                pass
        for p in targets:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(is_alive(p) for p in targets):
            time.sleep(0.2)
        if not any(is_alive(p) for p in targets):
            return []
    return [p for p in targets if is_alive(p)]


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback URLs we built
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, pid: int, *, timeout_s: float, log_path: Path | None = None) -> None:
    """Block until ``url`` answers 2xx; raise StackError if ``pid`` dies or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if not is_alive(pid):
            raise StackError(f"process {pid} exited before {url} became healthy{_tail(log_path)}")
        time.sleep(0.5)
    raise StackError(f"{url} not healthy after {timeout_s:.0f} s{_tail(log_path)}")


def _tail(log_path: Path | None, lines: int = 25) -> str:
    if log_path is None or not log_path.exists():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log_path} ---\n" + "\n".join(text)
