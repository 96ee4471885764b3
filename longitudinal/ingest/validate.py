"""Validation: collect every problem of every scan of a session before anything of it is written.

Checked per file, before any byte is read: missing; outside the allowed root; not a regular file (a device,
a named pipe); larger on disk than ``FileLimits.max_file_bytes`` (``files.py``). Before any voxel is decoded:
a header claiming more than ``FileLimits.max_voxels`` voxels or ``max_image_bytes`` decoded bytes (a
decompression bomb: a tiny gzip stream can claim and expand to gigabytes). Then: unreadable or truncated;
dimensionality (3D, or 4D with one volume); empty (no voxels, or every voxel equal); non-finite voxels;
implausible spacing; label values outside the schema (a source's own coding mapped first, ``relabel``); a label
grid that does not match its session's image. Per session: a missing, unparseable or implausible date (found
by discovery), a duplicate session date, a channel missing. Per patient: a hostile id. Every problem names the
file (relative to the source, with the manifest line that lists it) so a person can find it; none echoes a raw
patient id, a raw date or a DICOM tag.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from longitudinal.ingest.files import FileLimits, RefusedFile, check_file, iter_blocks, open_checked
from longitudinal.ingest.sources import LABEL_KEY, ScanFile, SessionSource
from storage.schema import LABEL_VALUES

# Plausible voxel sizes for clinical head imaging, in mm.
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 15.0
# Geometry tolerance between a label and its image (mm for origin/spacing, unitless for direction cosines).
GRID_TOLERANCE = 1e-3


@dataclass
class SessionScans:
    """The images of one validated session, read once and kept for preprocessing.

    images: channel -> 3D SimpleITK image (native grid, LPS physical space as ITK reads it).
    label: 3D uint8 image on the grid of ``images[<registration channel>]``, or None.
    sha256: channel (or "label") -> sha256 of the source bytes (``SessionRecord.source_sha256``).
    problems: every problem found; the session may only be stored when this is empty.
    """

    images: dict[str, sitk.Image] = field(default_factory=dict)
    label: sitk.Image | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def file_sha256(scan: ScanFile, limits: FileLimits | None = None) -> str:
    """sha256 of the source bytes: the file, or the files of a DICOM series in series order.

    Only regular files within ``limits`` are opened (``files.open_checked``). Raises OSError: RefusedFile
    (with its reason) for a file that is not read, FileNotFoundError for a missing one.
    """
    limits = limits or FileLimits()
    h = hashlib.sha256()
    for path in scan.paths:
        with open_checked(path, limits) as fh:
            for block in iter_blocks(fh, limits):
                h.update(block)
    return h.hexdigest()


def session_sha256(session: SessionSource, limits: FileLimits | None = None) -> dict[str, str] | None:
    """channel -> sha256 for every file of the session, or None when a file cannot (or may not) be read."""
    out = {}
    for key, scan in session.files().items():
        try:
            out[key] = file_sha256(scan, limits)
        except OSError:
            return None
    return out


def _where(scan: ScanFile) -> str:
    """The file as problems name it: its display name, and where the source lists it when that differs."""
    return f"{scan.display} at {scan.where}" if scan.where else scan.display


# Image formats stored as two files: the readers open the other half by name (".hdr" -> ".img", ...).
_PAIRED = {".hdr": ".img", ".img": ".hdr", ".par": ".rec", ".rec": ".par"}


def companions(path: Path) -> tuple[Path, ...]:
    """The files a reader opens beside ``path`` by name: the other half of an Analyze/NIfTI pair (.hdr/.img,
    gzipped or not) or of a PAR/REC pair, when such a name exists; empty for single-file formats."""
    name = path.name
    gz = name.lower().endswith(".gz")
    stem, ext = os.path.splitext(name[:-3] if gz else name)
    other = _PAIRED.get(ext.lower())
    if other is None:
        return ()
    other = other.upper() if ext.isupper() else other
    twin = path.with_name(stem + other + (name[-3:] if gz else ""))
    return (twin,) if os.path.lexists(twin) else ()


def file_problems(scan: ScanFile, limits: FileLimits) -> list[str]:
    """Why the files of ``scan`` may not be read at all (empty when they may): missing, outside the allowed
    root, not a regular file, too large on disk; the other half of a two-file image included. Opens nothing
    (stat only)."""
    named = [(path, _where(scan)) for path in scan.paths]
    if scan.kind == "nifti":
        named += [(twin, f"{twin.name} beside {_where(scan)}") for twin in companions(scan.paths[0])]
    for path, what in named:
        try:
            check_file(path, limits)
        except FileNotFoundError:
            return [f"missing file: {what}"]
        except RefusedFile as exc:
            return [exc.about(what)]
        except OSError as exc:
            return [f"unreadable file: {what} ({type(exc).__name__})"]
    return []


def _size_problem(scan: ScanFile, shape: tuple[int, ...], itemsize: int, limits: FileLimits) -> list[str]:
    """The voxel and decoded-size caps applied to a header's shape and bytes per voxel."""
    voxels = math.prod(int(d) for d in shape)
    nbytes = voxels * int(itemsize)
    if voxels > limits.max_voxels:
        return [f"image too large: {_where(scan)} (its header claims {'x'.join(map(str, shape))} = {voxels} voxels "
                f"> max_voxels {limits.max_voxels})"]
    if nbytes > limits.max_image_bytes:
        return [f"image too large: {_where(scan)} (its header claims {nbytes} decoded bytes "
                f"> max_image_bytes {limits.max_image_bytes})"]
    return []


def header_problems(scan: ScanFile, limits: FileLimits) -> list[str]:
    """Refuse an image whose header claims more than the caps, before any voxel is decoded.

    NIfTI (and the other formats nibabel opens): ``nibabel.load`` parses the header only (the data stays a
    proxy). DICOM: Rows x Columns x NumberOfFrames x SamplesPerPixel of the series' first file, times its number
    of files, at BitsAllocated bits (the reader sizes its buffer from the first file). A header that cannot be
    parsed is left to the readers, which report it as unreadable.
    """
    if scan.kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(scan.paths[0], stop_before_pixels=True, specific_tags=[
                "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"])
            rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
            bits = int(getattr(ds, "BitsAllocated", 16) or 16)
        except Exception:  # noqa: BLE001 - the image reader reports an unparseable file
            return []
        shape = (cols, rows, frames * len(scan.paths)) + ((samples,) if samples > 1 else ())
        return _size_problem(scan, shape, max(1, bits // 8), limits)
    import nibabel as nib

    try:
        header = nib.load(scan.paths[0]).header
        shape, itemsize = tuple(header.get_data_shape()), header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - nifti_problems reports it as unreadable
        return []
    return _size_problem(scan, shape, itemsize, limits)


def read_image(scan: ScanFile) -> sitk.Image:
    """Read a NIfTI file or a DICOM series with SimpleITK (raises RuntimeError/OSError when unreadable)."""
    if scan.kind == "dicom":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in scan.paths])
        # Tags are not loaded: nothing identifying is ever pulled into memory by the image reader.
        reader.MetaDataDictionaryArrayUpdateOff()
        reader.LoadPrivateTagsOff()
        return reader.Execute()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(scan.paths[0]))
    return reader.Execute()


def nifti_problems(scan: ScanFile) -> list[str]:
    """Byte-level checks SimpleITK cannot make: a truncated (gzip) stream, and NaN/Inf voxels, which ITK's
    NIfTI reader silently turns into 0. Decodes the whole image with nibabel: call ``header_problems`` first
    (nibabel reads exactly the bytes the header's shape needs, so a gzip stream longer than that is never
    inflated past it)."""
    import nibabel as nib

    try:
        img = nib.load(scan.paths[0])
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a reportable problem
        return [f"unreadable or truncated file: {scan.display} ({type(exc).__name__})"]
    if np.issubdtype(data.dtype, np.floating):
        bad = int((~np.isfinite(data)).sum())
        if bad:
            return [f"non-finite voxels in {scan.display}: {bad} NaN/Inf voxels"]
    return []


def check_image(image: sitk.Image, what: str, is_label: bool = False) -> tuple[sitk.Image | None, list[str]]:
    """Problems of one image (3D-ness, emptiness, finiteness, spacing, label values); returns the image as 3D.

    A 4D image with a single volume is accepted as 3D (some converters write a trailing 1).
    """
    problems: list[str] = []
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        dim, size = 3, image.GetSize()
    if dim != 3:
        problems.append(f"wrong dimensionality in {what}: {dim}D image of size {tuple(size)}, need 3D")
        return None, problems
    if min(size) < 2:
        problems.append(f"empty image in {what}: size {tuple(size)}")
        return None, problems
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        problems.append(
            f"implausible spacing in {what}: {tuple(round(float(s), 4) for s in spacing)} mm "
            f"(need {MIN_SPACING_MM}-{MAX_SPACING_MM} mm)"
        )
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        problems.append(f"degenerate orientation in {what}")
    data = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(data)
    if not finite.all():
        problems.append(f"non-finite voxels in {what}: {int((~finite).sum())} NaN/Inf voxels")
    valid = data[finite]
    if valid.size == 0 or (not is_label and float(valid.min()) == float(valid.max())):
        value = float(valid.flat[0]) if valid.size else float("nan")
        problems.append(f"empty image in {what}: every voxel equals {value:g}")
    if is_label and valid.size:
        values = np.unique(valid)
        bad = [v for v in values.tolist() if v not in LABEL_VALUES]
        if bad:
            problems.append(f"label values {bad[:5]} in {what} are not in {sorted(LABEL_VALUES)}")
    return image, problems


def relabel(image: sitk.Image, values: tuple[tuple[int, int], ...], what: str) -> tuple[sitk.Image, list[str]]:
    """A label in a source's own coding -> the store's classes (``ScanFile.values``: (source value, class)
    pairs), on the same grid. Problems (the image is then returned as it was): several components per voxel,
    a value that is not a finite integer, or a value the pairs do not list (another coding than configured)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        return image, [f"label {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel, need 1"]
    data = sitk.GetArrayFromImage(image)
    integral = np.isfinite(data).all() and np.array_equal(data, np.round(data))
    if np.issubdtype(data.dtype, np.floating) and not integral:
        return image, [f"label values in {what} are not all finite integers"]
    table = dict(values)
    keys = np.array(sorted(table), dtype=np.int64)
    found = np.unique(data).astype(np.int64)
    unknown = found[~np.isin(found, keys)].tolist()
    if unknown:
        return image, [f"label values {unknown[:5]} in {what} are not in the configured label map "
                       f"{dict(sorted(table.items()))}"]
    classes = np.array([table[k] for k in keys.tolist()], dtype=np.uint8)
    out = sitk.GetImageFromArray(classes[np.searchsorted(keys, data.astype(np.int64))])
    out.CopyInformation(image)
    return out, []


def grids_match(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, spacing, origin and direction within GRID_TOLERANCE."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=GRID_TOLERANCE)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=GRID_TOLERANCE)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=GRID_TOLERANCE)
    )


def validate_session(
    session: SessionSource, channels: tuple[str, ...], registration_channel: str, limits: FileLimits | None = None
) -> SessionScans:
    """Read and check every file of one session; collect every problem (discovery's included).

    channels: the channels every session must have. registration_channel: the channel the label must share
    its grid with. limits: what a file may be before it is read or decoded (default ``FileLimits()``).
    """
    limits = limits or FileLimits()
    out = SessionScans(problems=list(session.problems))
    for channel in channels:
        if channel not in session.scans:
            out.problems.append(f"channel {channel} missing at {session.origin}")
    for key, scan in session.files().items():
        what = scan.display
        refused = file_problems(scan, limits)
        if refused:
            out.problems.extend(refused)
            continue
        try:
            out.sha256[key] = file_sha256(scan, limits)
        except RefusedFile as exc:  # changed since the check above
            out.problems.append(exc.about(_where(scan)))
            continue
        except OSError as exc:
            out.problems.append(f"unreadable file: {what} ({type(exc).__name__})")
            continue
        too_large = header_problems(scan, limits)
        if too_large:
            out.problems.extend(too_large)
            continue
        pre = nifti_problems(scan) if scan.kind == "nifti" else []
        if any(p.startswith("unreadable") for p in pre):
            out.problems.extend(pre)
            continue
        try:
            raw = read_image(scan)
        except (RuntimeError, OSError) as exc:
            # The library's message can quote the absolute path; the relative name and the error kind suffice.
            out.problems.append(f"unreadable or truncated file: {what} ({type(exc).__name__})")
            continue
        if key == LABEL_KEY and scan.values:
            raw, unmapped = relabel(raw, scan.values, what)
            if unmapped:
                out.problems.extend(pre + unmapped)
                continue
        image, problems = check_image(raw, what, is_label=key == LABEL_KEY)
        problems = pre + [p for p in problems if not (pre and p.startswith("non-finite"))]
        out.problems.extend(problems)
        if image is None:
            continue
        if key == LABEL_KEY:
            out.label = sitk.Cast(image, sitk.sitkUInt8) if not problems else None
        elif not problems:
            out.images[key] = image
    if session.label is not None and out.label is not None and registration_channel in out.images:
        ref = out.images[registration_channel]
        if not grids_match(out.label, ref):
            out.problems.append(
                f"label grid does not match its image: {session.label.display} has size {out.label.GetSize()}, "
                f"spacing {tuple(round(s, 3) for s in out.label.GetSpacing())}; "
                f"{session.scans[registration_channel].display} has size {ref.GetSize()}, "
                f"spacing {tuple(round(s, 3) for s in ref.GetSpacing())}"
            )
    return out


def duplicate_date_problems(
    dates: dict[int, dt.datetime | None], origins: dict[int, str], stored: dict[dt.date, str] | None = None
) -> dict[int, list[str]]:
    """Sessions sharing a calendar date with another session (new or already stored): all of them are
    refused, since nothing says which one is right. Keys are the caller's session numbers; ``stored`` maps
    calendar dates of stored sessions to their labels (all dates shifted by the same per-patient offset)."""
    stored = stored or {}
    by_date: dict[dt.date, list[int]] = {}
    for k, when in dates.items():
        if when is not None:
            by_date.setdefault(when.date(), []).append(k)
    out: dict[int, list[str]] = {}
    for date, ks in by_date.items():
        if len(ks) > 1:
            for k in ks:
                others = ", ".join(origins[j] for j in ks if j != k)
                out.setdefault(k, []).append(f"duplicate session date: {origins[k]} has the same date as {others}")
        if date in stored:
            for k in ks:
                out.setdefault(k, []).append(
                    f"duplicate session date: {origins[k]} has the date of stored session {stored[date]} "
                    "but different content"
                )
    return out
