"""The per-patient writer lock of a cohort store.

Local disk: ``fcntl.flock`` on ``.locks/<pid>.lock``; the kernel drops it when its holder dies. Object stores:
a lease object ``.locks/<pid>.lock`` created with an exclusive PUT (``If-None-Match: *``), holding the
holder's host, process id, a token and the time; it is deleted on release. A lease whose holder is gone (same
host: the process no longer exists; another host: older than ``LOCK_STALE_S``) is broken by the next writer.
Breaking re-reads the lease first, so only a writer that read the same abandoned lease can delete it; two
writers breaking one abandoned lease within milliseconds of each other remain a (narrow) race, which the
generation check at commit (:mod:`storage._commit`) still catches.

The lock is re-entrant within a thread, so a writer holding it for a whole read-merge-commit can call the
commit steps that take it again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from storage._location import LOCKS, StoreLocation, pause, process_alive

# An object-store lease written by another host is considered abandoned after this long (seconds). It must
# exceed the longest legitimate hold: reading, merging, staging and committing one patient.
LOCK_STALE_S = 1800.0
# How long a writer waits for a patient held by a live writer before giving up (seconds): long enough for an
# abandoned foreign lease to go stale.
LOCK_WAIT_S = 2 * LOCK_STALE_S
# Recovery on open waits this long (seconds) for a locked patient, then leaves that write to the next open.
RECOVERY_LOCK_WAIT_S = 30.0

_HELD = threading.local()  # per thread: lock key -> re-entry depth
_OWN_TOKENS: set[str] = set()  # lease tokens held by threads of this process right now
_OWN_TOKENS_LOCK = threading.Lock()


def _held() -> dict[str, int]:
    held = getattr(_HELD, "locks", None)
    if held is None:
        held = _HELD.locks = {}
    return held


def lease_holder_alive(holder: dict) -> bool:
    """Whether the writer described by an object-store lease body may still be running."""
    if holder.get("host") == socket.gethostname():
        owner = int(holder.get("pid", -1))
        if owner == os.getpid():
            # A lease of this process outlives its holder only if a release failed.
            with _OWN_TOKENS_LOCK:
                return holder.get("token") in _OWN_TOKENS
        return owner > 0 and process_alive(owner)
    return time.time() - float(holder.get("time", 0.0)) < LOCK_STALE_S


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another writer"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(holder.get("time", 0.0))))
    return f"process {holder.get('pid')} on {holder.get('host')} since {since}"


class PatientLocking(StoreLocation):
    """Mixin of CohortStore: ``_patient_lock`` and the clean-up of abandoned leases."""

    def _lock_key(self, pid: str) -> str:
        path = self._path(LOCKS, f"{pid}.lock")
        if self.is_local:
            return "file://" + os.path.realpath(path)
        endpoint = (self.storage_options.get("client_kwargs") or {}).get("endpoint_url", "")
        return f"{self._fs.protocol!r}|{endpoint}|{path}"

    @contextlib.contextmanager
    def _patient_lock(self, pid: str, timeout_s: float | None = None) -> Iterator[None]:
        """Hold patient ``pid``'s writer lock across threads, processes and (object stores) hosts.

        Re-entrant within a thread. ``timeout_s``: give up after this many seconds with TimeoutError (an
        OSError); None waits until a local holder exits, or up to ``LOCK_WAIT_S`` on object stores.
        """
        key = self._lock_key(pid)
        held = _held()
        if key in held:
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        acquire = self._flock if self.is_local else self._lease
        with acquire(pid, timeout_s):
            held[key] = 1
            try:
                yield
            finally:
                del held[key]

    @contextlib.contextmanager
    def _flock(self, pid: str, timeout_s: float | None) -> Iterator[None]:
        import fcntl

        os.makedirs(self._path(LOCKS), exist_ok=True)
        with open(self._path(LOCKS, f"{pid}.lock"), "a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pause("lock-wait")
                self._flock_wait(fh.fileno(), pid, timeout_s)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _flock_wait(self, fd: int, pid: str, timeout_s: float | None) -> None:
        import fcntl

        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        deadline, delay = time.monotonic() + timeout_s, 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        errno.ETIMEDOUT, f"patient {pid} of store {self.url} stayed locked for {timeout_s:g} s"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 0.2)

    @contextlib.contextmanager
    def _lease(self, pid: str, timeout_s: float | None) -> Iterator[None]:
        path = self._path(LOCKS, f"{pid}.lock")
        token = uuid.uuid4().hex
        body = {"patient_id": pid, "host": socket.gethostname(), "pid": os.getpid(), "token": token}
        wait_s = LOCK_WAIT_S if timeout_s is None else timeout_s
        deadline, delay, waited = time.monotonic() + wait_s, 0.02, False
        while not self._create_lease(path, json.dumps(body | {"time": time.time()}).encode()):
            holder = self._lease_holder(path)
            if holder is not None and not lease_holder_alive(holder):
                self._break_lease(path, holder)
                continue
            if not waited:
                pause("lock-wait")
                waited = True
            if time.monotonic() > deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"patient {pid} of store {self.url} is locked by {_describe(holder)}; waited {wait_s:g} s",
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.25)
        with _OWN_TOKENS_LOCK:
            _OWN_TOKENS.add(token)
        try:
            yield
        finally:
            with _OWN_TOKENS_LOCK:
                _OWN_TOKENS.discard(token)
            holder = self._lease_holder(path)
            if holder is not None and holder.get("token") == token:
                self._rm(path)

    def _create_lease(self, path: str, data: bytes) -> bool:
        """One exclusive PUT of the lease; False when another writer's lease exists."""
        try:
            self._fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:
            # A filesystem without exclusive create: check-then-put, exclusive only against slower writers.
            if self._fs.exists(path):
                return False
            self._fs.pipe_file(path, data)
        except OSError as exc:
            # S3 answers 409 (EBUSY) when conditional PUTs of one key race: the other one won.
            if exc.errno == errno.EBUSY:
                return False
            raise
        return True

    def _lease_holder(self, path: str) -> dict | None:
        """The lease body; None when there is no lease, {} when it cannot be parsed (treated as abandoned)."""
        try:
            raw = self._fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _break_lease(self, path: str, stale: dict) -> None:
        # Re-read first: delete only the very lease judged abandoned, never one a racing writer just made.
        if self._lease_holder(path) == stale:
            self._rm(path)

    def _clear_abandoned_leases(self) -> list[str]:
        """Delete object-store leases whose holder is gone; returns what was done (one line each)."""
        if self.is_local:
            return []  # flock files carry no state once their holder exits
        done = []
        for entry in self._listdir(LOCKS):
            path = self._path(LOCKS, entry)
            with contextlib.suppress(OSError):
                holder = self._lease_holder(path)
                if holder is not None and not lease_holder_alive(holder):
                    self._break_lease(path, holder)
                    done.append(f"removed abandoned lock {LOCKS}/{entry}")
        return done
