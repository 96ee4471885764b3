"""Peak memory of ingesting decompression bombs. Prints a table; not a test.

    .venv/bin/python benchmarks/ingest_bombs.py [--repo PATH] [--work DIR]

Each case is a one-session manifest (T1c = the case's file, FLAIR = a small valid volume) ingested into a fresh
store by ``ingest_cohort`` in its own subprocess, so the peak resident set size (``ru_maxrss`` of that process,
imports included) is the case's own. Cases:

- valid: a 32^3 float32 T1c (the floor: imports plus one small session);
- header bomb: an 84-byte .nii.gz whose header claims 1000^3 float32 voxels (4 GB) and holds none;
- gzip bomb: a ~0.5 MB .nii.gz whose header claims 1024 x 1024 x 512 uint8 voxels, all zero (512 MiB inflated);
- trailing bomb: a valid 32^3 header and data followed by 512 MiB of zeros inside the same gzip stream (readers
  decode only the bytes the header's shape needs, so this one should cost no more than "valid").

``--repo`` picks the checkout whose code is measured (default: this one), e.g. a copy of an older commit with
``git archive``, so the same script measures before and after a change.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEY = "benchmark-pseudonym-key"
MiB = 1 << 20


def _affine(mm: float) -> np.ndarray:
    return np.diag([mm, mm, mm, 1.0])


def _valid(path: Path, seed: int) -> Path:
    """A 32^3 float32 head-like volume (textured ball) at 4 mm."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(32.0),) * 3, indexing="ij")
    ball = (((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) < 144).astype(np.float32)
    nib.save(nib.Nifti1Image(ball * rng.uniform(100, 200, ball.shape).astype(np.float32), _affine(4.0)), path)
    return path


def _header(shape: tuple[int, ...], dtype: type, mm: float) -> bytes:
    """A NIfTI-1 single-file header (352 bytes, data at offset 352)."""
    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), _affine(mm))
    hdr = img.header.copy()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def _gzip_stream(path: Path, head: bytes, zeros: int) -> Path:
    """``head`` then ``zeros`` zero bytes, gzip-compressed at level 9 (zeros shrink about 1000-fold)."""
    block = b"\0" * MiB
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(head)
        for _ in range(zeros // MiB):
            fh.write(block)
        fh.write(b"\0" * (zeros % MiB))
    return path


def build(work: Path) -> dict[str, Path]:
    """One manifest per case under ``work``; case -> manifest."""
    work.mkdir(parents=True, exist_ok=True)
    flair = _valid(work / "flair.nii.gz", 1)
    t1c = {
        "valid": _valid(work / "valid.nii.gz", 2),
        "header bomb": _gzip_stream(work / "header_bomb.nii.gz", _header((1000, 1000, 1000), np.float32, 1.0), 0),
        "gzip bomb": _gzip_stream(work / "gzip_bomb.nii.gz", _header((1024, 1024, 512), np.uint8, 1.0), 512 * MiB),
    }
    valid = _valid(work / "trailing_head.nii.gz", 3)
    with gzip.open(valid, "rb") as fh:
        head = fh.read()
    t1c["trailing bomb"] = _gzip_stream(work / "trailing_bomb.nii.gz", head, 512 * MiB)
    manifests = {}
    for k, (case, path) in enumerate(t1c.items()):
        manifest = work / f"case{k}.csv"
        with manifest.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "date", "channel", "path", "label_path"])
            w.writerow(["P1", "2020-01-01", "T1c", str(path), ""])
            w.writerow(["P1", "2020-01-01", "FLAIR", str(flair), ""])
        manifests[case] = manifest
    return manifests


def _child(manifest: str, store: str, home: str) -> dict:
    from longitudinal.ingest import ingest_cohort
    from longitudinal.settings import Settings

    settings = Settings(home=home, pseudonym_key=KEY, target_spacing_mm=4.0)
    t0 = time.perf_counter()
    report = ingest_cohort(manifest, store, settings)
    seconds = time.perf_counter() - t0
    reasons = [r for p in report.patients for s in p.sessions for r in s.reasons]
    reasons += [p.error for p in report.patients if p.error]
    return {
        "seconds": seconds,
        "stored": report.stored,
        "quarantined": report.quarantined,
        "reason": "; ".join(reasons),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "code": str(Path(sys.modules["longitudinal"].__file__).parents[1]),
    }


def run_case(repo: Path, manifest: Path, work: Path, timeout_s: float) -> dict:
    """Ingest ``manifest`` with the code of ``repo`` in a fresh subprocess and store; its measurements."""
    tag = manifest.stem
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(Path(__file__).resolve()), "--child", str(manifest), str(work / f"{tag}.zarr"),
            str(work / f"home-{tag}")]
    try:
        out = subprocess.run(args, env=env, cwd=work, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code is measured")
    parser.add_argument("--work", type=Path, default=None, help="folder for the inputs (default: a temp folder)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per case")
    parser.add_argument("--child", nargs=3, metavar=("MANIFEST", "STORE", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return

    with tempfile.TemporaryDirectory(prefix="ingest-bombs-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        manifests = build(work)
        rows = []
        for case, manifest in manifests.items():
            t1c = next(csv.DictReader(manifest.open()))["path"]
            res = run_case(args.repo.resolve(), manifest, work, args.timeout_s)
            rows.append((case, Path(t1c).stat().st_size, res))
    imported = {res["code"] for _, _, res in rows if "code" in res}
    print(f"code measured: {args.repo.resolve()} (imported from {', '.join(sorted(imported)) or '?'})")
    print("| case | T1c on disk | peak RSS | time | outcome |")
    print("| --- | --- | --- | --- | --- |")
    for case, size, res in rows:
        if "error" in res:
            print(f"| {case} | {size:,} B | - | - | {res['error']} |")
            continue
        outcome = "stored" if res["stored"] else f"quarantined: {res['reason'][:110]}"
        print(f"| {case} | {size:,} B | {res['peak_rss_mb']:.0f} MB | {res['seconds']:.1f} s | {outcome} |")


if __name__ == "__main__":
    main()
