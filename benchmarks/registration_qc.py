"""Does the registration QC metric separate good registrations from bad ones?

For each later session of a few synthetic patients (default preset): register it to the baseline as ingest does,
then score 1 - NCC on raw (normalised) intensities, after the bias-removing log high-pass that
``registration_qc`` uses, and after the high-pass with the tumour labels of both scans dilated by
``qc_exclude_margin_mm`` left out (what ingest does), for the registration itself and for the same registration
spoiled by a 4 mm shift or a 4 degree rotation. Rows of treated patients' post-operative sessions (a cavity where
the tumour was, ``--treated-fraction``) are shown apart. A useful QC keeps every "registered" row below the
threshold and every spoiled row above it.

    .venv/bin/python benchmarks/registration_qc.py --patients 4 [--treated-fraction 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.table import Table

from longitudinal.ingest.preprocess import normalise, to_ras
from longitudinal.registration.geometry import image_on_grid
from longitudinal.registration.rigid import (
    RegistrationConfig,
    qc_exclusion,
    register,
    registration_qc,
    resample_onto,
)
from longitudinal.synth import generate_cohort, load_ground_truth


def _load(root: Path, sub: str, ses: str) -> sitk.Image:
    path = next((root / f"sub-{sub}" / f"ses-{ses}" / "anat").glob("*_ce-gd_T1w.nii.gz"))
    img = to_ras(sitk.ReadImage(str(path)), 2.0)
    return image_on_grid(normalise(sitk.GetArrayFromImage(img)), img)


def _label(root: Path, sub: str, ses: str) -> sitk.Image:
    return sitk.ReadImage(str(root / "derivatives" / "labels" / f"sub-{sub}" / f"ses-{ses}" / "anat"
                              / f"sub-{sub}_ses-{ses}_dseg.nii.gz"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--treated-fraction", type=float, default=0.5)
    args = ap.parse_args()
    config = RegistrationConfig()
    raw_cfg = RegistrationConfig(highpass_sigma_mm=None)
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        generate_cohort(root, args.patients, args.seed, preset="default", treated_fraction=args.treated_fraction)
        for subdir in sorted(root.glob("sub-*")):
            sub = subdir.name[4:]
            sessions = sorted(p.name[4:] for p in subdir.glob("ses-*"))
            truth = {s["session_id"][4:]: s for s in load_ground_truth(root, sub)["sessions"]}
            fixed = _load(root, sub, sessions[0])
            fixed_label = sitk.GetArrayFromImage(resample_onto(_label(root, sub, sessions[0]), fixed, None, True))
            for ses in sessions[1:]:
                moving = _load(root, sub, ses)
                tx = register(fixed, moving).transform
                group = " (post-operative)" if truth[ses]["cavity_ml"] > 0 else ""
                spoiled = {
                    "registered": tx,
                    "shifted 4 mm": sitk.CompositeTransform([tx, sitk.TranslationTransform(3, (4.0, 0.0, 0.0))]),
                    "rotated 4 deg": sitk.CompositeTransform(
                        [tx, sitk.Euler3DTransform((0.0, 0.0, 0.0), float(np.deg2rad(4.0)), 0.0, 0.0)]),
                }
                for name, t in spoiled.items():
                    moved = resample_onto(moving, fixed, t)
                    moved_label = sitk.GetArrayFromImage(resample_onto(_label(root, sub, ses), fixed, t, True))
                    exclude = qc_exclusion([fixed_label, moved_label], (2.0, 2.0, 2.0), config.qc_exclude_margin_mm)
                    r = rows.setdefault(name + group, {"raw": [], "highpass": [], "excluded": []})
                    r["raw"].append(registration_qc(fixed, moved, raw_cfg))
                    r["highpass"].append(registration_qc(fixed, moved))
                    r["excluded"].append(registration_qc(fixed, moved, config, exclude))
    limit = config.qc_max_metric
    table = Table(title=f"registration QC (1 - NCC), {args.patients} default-preset patients "
                        f"(treated fraction {args.treated_fraction}), threshold {limit}")
    for col in ("case", "n", "raw min-max", "high-pass min-max", "high-pass, tumours left out min-max"):
        table.add_column(col)
    for name, r in sorted(rows.items()):
        table.add_row(name, str(len(r["raw"])), *(f"{min(r[k]):.3f}-{max(r[k]):.3f}"
                                                   for k in ("raw", "highpass", "excluded")))
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
