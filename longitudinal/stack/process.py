"""Detached server processes: start in their own session, probe over HTTP, stop the whole group.

Each service runs in a new session (its pid is its process-group id), so ``stop`` can signal the server and
every child it forked (uvicorn workers, flow-run subprocesses) at once, even after the command that
started it has exited. Descendants that moved to a session of their own are found through /proc first.

A pid alone does not name a process: after a crash or a reboot the kernel hands it to another one. So
``start_detached`` also records a ``ProcessIdentity`` (start time, boot, command line), and nothing is
signalled unless the process behind the pid still has that identity.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PROC = Path("/proc")


class StackError(RuntimeError):
    """A stack operation failed; the message lists every problem."""


@dataclass(frozen=True)
class ProcessIdentity:
    """What tells a process apart from a later one that got the same pid.

    With /proc: ``start_time`` is field 22 of /proc/<pid>/stat (clock ticks since boot), ``boot_id`` is
    /proc/sys/kernel/random/boot_id (ticks restart at every boot) and ``cmdline`` is /proc/<pid>/cmdline.
    Without /proc (macOS): ps's ``lstart`` (wall-clock, so a reboot changes it too), ``sysctl kern.boottime``
    and ps's command as one string.
    """

    start_time: str
    boot_id: str
    cmdline: tuple[str, ...]

    def matches(self, other: ProcessIdentity) -> bool:
        """Same process running the same program.

        An empty command line matches any: /proc shows one while a process is between exec and its new argv,
        or while it exits; start time and boot alone already pin a process, the command line only confirms.
        """
        same_start = (self.boot_id, self.start_time) == (other.boot_id, other.start_time)
        return same_start and (self.cmdline == other.cmdline or not self.cmdline or not other.cmdline)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ProcessIdentity:
        """The identity from its JSON form (``dataclasses.asdict`` writes it)."""
        return cls(str(raw["start_time"]), str(raw["boot_id"]), tuple(str(a) for a in raw["cmdline"]))


@dataclass(frozen=True)
class DetachedProcess:
    """A process ``start_detached`` started: its pid (also its process-group id) and its identity.

    ``identity`` is None only when it could not be read (the process exited at once, or neither /proc nor
    ps is available); such a process can never be verified, so it is never signalled later.
    """

    pid: int
    identity: ProcessIdentity | None


ProcessState = Literal["running", "gone", "replaced", "unverifiable"]


@dataclass(frozen=True)
class ProcessCheck:
    """Is the recorded process still behind its pid? ``detail`` says why not, for the user."""

    state: ProcessState
    detail: str = ""


def start_detached(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> DetachedProcess:
    """Start ``argv`` in a new session with stdout+stderr appended to ``log_path``; return its pid and identity."""
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
    # The child is not reaped yet, so its pid cannot have been reused: this reads the program just started.
    # Popen returns once exec has closed its error pipe, a moment before the kernel sets up the new command
    # line, which /proc shows empty until then (an argv never is).
    identity = process_identity(proc.pid)
    deadline = time.monotonic() + 5.0
    while identity is not None and not identity.cmdline and time.monotonic() < deadline:
        time.sleep(0.005)
        identity = process_identity(proc.pid)
    return DetachedProcess(proc.pid, identity)


def _stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (the name in field 2 may hold spaces and ')', so split after the last)."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _has_proc() -> bool:
    return (PROC / "self" / "stat").exists()


def boot_id() -> str:
    """An id of the current boot ("" where none can be read)."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "kern.boottime"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _ps_identity(pid: int) -> ProcessIdentity | None:
    """Identity from ps, for systems without /proc."""
    env = dict(os.environ, LC_ALL="C")  # lstart is a localised date
    try:
        start = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10, env=env
        )
        command = subprocess.run(
            ["ps", "-ww", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if start.returncode != 0 or command.returncode != 0 or not start.stdout.strip():
        return None
    return ProcessIdentity(start.stdout.strip(), boot_id(), (command.stdout.strip(),))


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of the process now holding ``pid`` (None when there is none, it is a zombie, or unreadable)."""
    if not _has_proc():
        return _ps_identity(pid) if is_alive(pid) else None
    try:
        fields = _stat_fields(pid)
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] == "Z":
        return None
    # Arguments are NUL-terminated; an empty cmdline (kernel thread) stays empty.
    args = tuple(os.fsdecode(a) for a in raw.split(b"\0")[:-1]) if raw else ()
    return ProcessIdentity(start_time=fields[19], boot_id=boot_id(), cmdline=args)


def same_process(pid: int, identity: ProcessIdentity) -> bool:
    """True while ``pid`` is still the process ``identity`` was read from."""
    current = process_identity(pid)
    return current is not None and current.matches(identity)


def check_process(pid: int, recorded: ProcessIdentity | None) -> ProcessCheck:
    """Compare what holds ``pid`` now with what was recorded when it was started."""
    if not is_alive(pid):
        return ProcessCheck("gone")
    current = process_identity(pid)
    if current is None:
        return ProcessCheck("unverifiable", f"the start time and command line of pid {pid} cannot be read")
    if recorded is None:
        return ProcessCheck(
            "unverifiable",
            f"pid {pid} was recorded without its start time and command line (a state file written by an "
            "older version), so it cannot be told apart from another process that got the same pid",
        )
    if current.matches(recorded):
        return ProcessCheck("running")
    runs = f"it runs {_short(current.cmdline)!r}, not {_short(recorded.cmdline)!r}"
    if (current.boot_id, current.start_time) == (recorded.boot_id, recorded.start_time):
        # Same process, another program (it exec'd): still not what the stack started, so hands off.
        return ProcessCheck("replaced", f"pid {pid} no longer runs the recorded command ({runs})")
    why = [
        "the machine has restarted since it was recorded"
        if current.boot_id != recorded.boot_id
        else f"its start time is {current.start_time}, not the recorded {recorded.start_time}"
    ]
    if current.cmdline != recorded.cmdline:
        why.append(runs)
    return ProcessCheck(
        "replaced",
        f"the recorded process is gone and pid {pid} now belongs to another process ({'; '.join(why)})",
    )


def stop_by_hand(pid: int) -> str:
    """How a user checks and stops a process group the stack would not signal itself."""
    return f"check it with `ps -o pid,lstart,args -p {pid}` and, if it is the stack's, stop it with `kill -TERM -- -{pid}`"


def _short(cmdline: Sequence[str], width: int = 100) -> str:
    text = " ".join(cmdline)
    return text if len(text) <= width else text[: width - 3] + "..."


def is_alive(pid: int) -> bool:
    """True while ``pid`` is a running process (a zombie, which holds no ports or memory, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return True


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process in /proc (empty where /proc is unavailable)."""
    table: dict[int, tuple[int, int]] = {}
    if not PROC.is_dir():
        return table
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (empty where /proc is unavailable)."""
    return _descendants(pid, _process_table())


def _descendants(pid: int, table: Mapping[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(child)
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (empty where /proc is unavailable)."""
    return sorted(p for p, (_, group) in _process_table().items() if group == pgid and is_alive(p))


def _targets(pid: int, identity: ProcessIdentity) -> dict[int, ProcessIdentity]:
    """``pid`` and every process that is verifiably its: its descendants, and the members of its group and of
    groups its descendants lead (children orphaned to init stay in those groups). Read while ``pid`` is
    verified, so a group id here cannot belong to a stranger."""
    table = _process_table()
    tree = {pid, *_descendants(pid, table)}
    tree |= {p for p, (_, group) in table.items() if group in tree}
    targets = {pid: identity}
    for p in sorted(tree - {pid}):
        found = process_identity(p)
        if found is not None:
            targets[p] = found
    return targets


def stop_group(pid: int, identity: ProcessIdentity, *, grace_s: float = 20.0) -> list[int]:
    """SIGTERM the process group led by ``pid`` and its stray descendants; SIGKILL what outlives ``grace_s``.

    Only while ``pid`` is still the process ``identity`` describes: a pid now held by another process is
    left alone, with everything under it. Each target is re-identified before every signal, so a pid that
    exits during the grace period and is handed to someone else is not hit either.
    Returns the pids of the stack's processes still alive afterwards (empty on success).
    """
    if not same_process(pid, identity):
        return []
    targets = _targets(pid, identity)

    def ours() -> dict[int, ProcessIdentity]:
        return {p: ident for p, ident in targets.items() if same_process(p, ident)}

    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = ours()
        for p in live:
            try:
                # A verified group leader vouches for its group, which also reaches children forked since.
                if os.getpgid(p) == p:
                    os.killpg(p, sig)
            except OSError:
                pass
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and ours():
            time.sleep(0.2)
        if not ours():
            return []
    return sorted(ours())


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
