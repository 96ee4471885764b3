"""Opening source files safely: only regular files, under a size cap, optionally inside an allowed root.

Every file ingest reads from a source (images, labels, manifests, BIDS sessions tables) passes ``check_file``
before any byte of it is read. The path is resolved (symlinks followed) and ``os.stat``-ed: a character device
such as /dev/zero, a named pipe (FIFO) or a socket is never opened, because reading it either never ends or
blocks until some other process writes, and one such file would stall the whole cohort. A regular file larger
than ``FileLimits.max_file_bytes`` is refused by its stat size, so every read is bounded.

There is no read timeout: a regular file of bounded size always reaches its end, and a filesystem that stops
answering (a dead network mount) blocks inside the kernel, beyond any timeout Python could set. ``open_checked``
repeats the check on the open descriptor (fstat) and opens without blocking, so a file swapped for a pipe between
the check and the open is still refused instead of blocking the open. Readers that open paths themselves
(nibabel, SimpleITK) are only called after the check; the source is assumed not to be rewritten during a run.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from longitudinal.settings import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_VOXELS,
    Settings,
)

# Bytes per read while streaming a file (hashing).
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileLimits:
    """Caps on what ingest reads from a source (``Settings.max_*`` and ``Settings.allowed_root``).

    max_file_bytes: largest file read, in bytes on disk (stat size; a DICOM series is capped per file).
    max_image_bytes: largest decoded image, in bytes (voxels x bytes per voxel, from the header).
    max_voxels: most voxels in one image (product of every dimension the header gives).
    allowed_root: when set, every file must resolve (symlinks followed) inside this folder.
    """

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_voxels: int = DEFAULT_MAX_VOXELS
    allowed_root: Path | None = None

    def __post_init__(self) -> None:
        if self.allowed_root is not None:
            # Compared with resolved file paths, so it is resolved too (a frozen dataclass: set it directly).
            object.__setattr__(self, "allowed_root", Path(self.allowed_root).expanduser().resolve())

    @classmethod
    def of(cls, settings: Settings) -> FileLimits:
        """The limits ``settings`` sets."""
        return cls(settings.max_file_bytes, settings.max_image_bytes, settings.max_voxels, settings.allowed_root)


class RefusedFile(OSError):
    """A source file ingest does not read. ``reason`` says why ("not a regular file") and ``detail`` gives the
    particulars ("a named pipe"), neither naming the file: callers name it as their source does."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail

    def about(self, what: str) -> str:
        """The problem as reported: "<reason>: <what> (<detail>)"."""
        return f"{self.reason}: {what}" + (f" ({self.detail})" if self.detail else "")


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _check_stat(st: os.stat_result, limits: FileLimits) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile("not a regular file", _kind(st.st_mode))
    if st.st_size > limits.max_file_bytes:
        raise RefusedFile("file too large", f"{st.st_size} bytes on disk > max_file_bytes {limits.max_file_bytes}")


def check_file(path: str | os.PathLike, limits: FileLimits) -> Path:
    """The resolved path of ``path`` when ingest may read it. Nothing is opened.

    Raises FileNotFoundError when it (or a symlink's target) does not exist, RefusedFile when it lies outside
    the allowed root, is not a regular file or is larger than ``limits.max_file_bytes``, and OSError when it
    cannot be stat-ed (e.g. PermissionError).
    """
    try:
        resolved = Path(path).resolve(strict=True)
    except RuntimeError as exc:  # a symlink loop (Python 3.11 raises RuntimeError, later versions OSError)
        raise RefusedFile("unresolvable path", "symlink loop") from exc
    if limits.allowed_root is not None and not resolved.is_relative_to(limits.allowed_root):
        raise RefusedFile("outside the allowed root", f"it resolves outside {limits.allowed_root}")
    _check_stat(os.stat(resolved), limits)
    return resolved


@contextmanager
def open_checked(path: str | os.PathLike, limits: FileLimits) -> Iterator[BinaryIO]:
    """``path`` opened for binary reading after ``check_file``, re-checked on the open descriptor.

    O_NONBLOCK: opening a named pipe for reading otherwise waits for a writer, before fstat could refuse it.
    Raises what ``check_file`` raises.
    """
    resolved = check_file(path, limits)
    fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _check_stat(os.fstat(fd), limits)
        os.set_blocking(fd, True)  # a regular file: plain reads from here on
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


@contextmanager
def open_text(path: str | os.PathLike, limits: FileLimits) -> Iterator[TextIO]:
    """``open_checked`` as UTF-8 text for the csv module. "utf-8-sig" drops a leading byte-order mark (Excel's
    "CSV UTF-8" writes one), which would otherwise become part of the first column's name."""
    with open_checked(path, limits) as fh, io.TextIOWrapper(fh, encoding="utf-8-sig", newline="") as text:
        yield text


def iter_blocks(fh: BinaryIO, limits: FileLimits) -> Iterator[bytes]:
    """The bytes of an open checked file in blocks of BLOCK_BYTES; raises RefusedFile once more than
    ``limits.max_file_bytes`` were read (a file that grew after its stat)."""
    total = 0
    for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
        total += len(block)
        if total > limits.max_file_bytes:
            raise RefusedFile("file too large", f"grew past max_file_bytes {limits.max_file_bytes} while read")
        yield block
