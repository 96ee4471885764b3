"""Does the registration QC tell a change of the patient from a misregistration?

For each later session of a synthetic cohort: register its T1c to the baseline as ingest does (both reoriented
and resampled to 2 mm, normalised), resample the native T1c and label through the result as ingest does, and
score 1 - NCC on raw (normalised) intensities, after the bias-removing log high-pass that ``registration_qc`` uses,
and after the high-pass with both scans' tumours dilated by ``qc_exclude_margin_mm`` left out (what ingest
decides on). The same session is then deliberately misregistered: the registration composed with a shift of
``--shift-mm`` along R, A or S, or a rotation of ``--rotate-deg`` about the x, y or z axis through the head's
centre (six spoils per session).

A session counts as correctly registered when its registration error against the generator's known motion is
at most ``--correct-mm`` everywhere in the head. Reported: how many correctly registered sessions the QC would
quarantine (target 0) and how many spoiled ones it catches (target at least 95 %), per group (post-operative
sessions, sessions where either scan's tumour exceeds 150 ml).

The "hard" preset (large tumours growing past 150 ml, wide resections, strong bias fields) with ``--gain``
(each session's and channel's intensities multiplied by a per-visit scanner gain, log-uniform in the range) is
the stress test; fit a threshold on one seed (``--threshold``) and confirm it on another:

    .venv/bin/python benchmarks/registration_qc.py --preset hard --patients 6 --seed 101 --gain 0.5 2
    .venv/bin/python benchmarks/registration_qc.py --preset hard --patients 6 --seed 202 --gain 0.5 2
    .venv/bin/python benchmarks/registration_qc.py --patients 4 [--treated-fraction 0.5]   # default preset
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.table import Table

from longitudinal.ingest.preprocess import normalise, to_ras
from longitudinal.registration.geometry import image_on_grid, ras_affine
from longitudinal.registration.rigid import (
    RegistrationConfig,
    qc_exclusion,
    register,
    registration_qc,
    resample_onto,
)
from longitudinal.synth import generate_cohort, load_ground_truth

LARGE_ML = 150.0


@dataclass
class Scores:
    """QC scores (1 - NCC) of one group of cases: raw, high-passed, high-passed with the tumours left out."""

    raw: list[float] = field(default_factory=list)
    highpass: list[float] = field(default_factory=list)
    excluded: list[float] = field(default_factory=list)


def _t1c(root: Path, sub: str, ses: str) -> Path:
    return next((root / sub / ses / "anat").glob("*_ce-gd_T1w.nii.gz"))


def _label(root: Path, sub: str, ses: str) -> sitk.Image:
    return sitk.ReadImage(str(root / "derivatives" / "labels" / sub / ses / "anat" / f"{sub}_{ses}_dseg.nii.gz"))


def _apply_gain(root: Path, lo: float, hi: float, seed: int) -> None:
    """Multiply every session's images by a scanner gain drawn per visit and channel, log-uniform in [lo, hi]
    (int16 kept, clipped to its range): what a rescaling by the scanner or the converter does."""
    rng = np.random.default_rng([seed, 7919])
    for path in sorted(root.glob("sub-*/ses-*/anat/*.nii.gz")):
        image = sitk.ReadImage(str(path))
        gain = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        arr = np.clip(np.rint(sitk.GetArrayViewFromImage(image).astype(np.float64) * gain), 0, 32767)
        out = sitk.GetImageFromArray(arr.astype(np.int16))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path), useCompression=True)


def _cohort(args: argparse.Namespace, tmp: Path) -> Path:
    """The cohort's BIDS folder: generated under ``--work`` (kept and reused) or a temporary folder."""
    gain = f"-gain{args.gain[0]:g}-{args.gain[1]:g}" if args.gain else ""
    name = f"bids-{args.preset}-s{args.seed}-n{args.patients}-t{args.treated_fraction:g}{gain}"
    root = (args.work or tmp) / name
    if (root / ".complete").exists():
        return root
    t0 = time.perf_counter()
    generate_cohort(root, args.patients, args.seed, preset=args.preset, treated_fraction=args.treated_fraction)
    if args.gain:
        _apply_gain(root, args.gain[0], args.gain[1], args.seed)
    (root / ".complete").write_text("")
    print(f"generated {args.patients} {args.preset} patients (seed {args.seed}) in {time.perf_counter() - t0:.0f} s")
    return root


def _spoils(tx: sitk.Transform, centre_lps: np.ndarray, shift_mm: float, rotate_deg: float
            ) -> dict[str, sitk.Transform]:
    """The registration ``tx`` (reference point -> session point, LPS) and six misregistrations of it: the
    reference point first moved by ``shift_mm`` along one axis or rotated by ``rotate_deg`` about one axis through
    ``centre_lps`` (ITK applies a composite's last transform first)."""
    out: dict[str, sitk.Transform] = {"registered": tx}
    for axis, name in enumerate("RAS"):
        offset = [0.0, 0.0, 0.0]
        offset[axis] = shift_mm * (-1.0 if axis < 2 else 1.0)  # +R / +A are -x / -y in LPS
        out[f"shift {name} {shift_mm:g} mm"] = sitk.CompositeTransform([tx, sitk.TranslationTransform(3, offset)])
        angles = [0.0, 0.0, 0.0]
        angles[axis] = float(np.deg2rad(rotate_deg))
        rotation = sitk.Euler3DTransform(centre_lps.tolist(), *angles)
        out[f"rotate {'xyz'[axis]} {rotate_deg:g} deg"] = sitk.CompositeTransform([tx, rotation])
    return out


def _tre_max(to_reference_ras: np.ndarray, pts_ras: np.ndarray, truth: np.ndarray) -> float:
    """Largest registration error (mm) over ``pts_ras`` (N, 4) of the reference: the estimated reference ->
    session map (inverse of ``to_reference_ras``) against the true one."""
    est = pts_ras @ np.linalg.inv(to_reference_ras).T
    true = pts_ras @ truth.T
    return float(np.linalg.norm(est[:, :3] - true[:, :3], axis=1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--preset", default="default", choices=["default", "hard", "tiny"])
    ap.add_argument("--treated-fraction", type=float, default=0.5)
    ap.add_argument("--gain", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                    help="per-visit scanner gain range (log-uniform), e.g. 0.5 2")
    ap.add_argument("--shift-mm", type=float, default=4.0)
    ap.add_argument("--rotate-deg", type=float, default=4.0)
    ap.add_argument("--correct-mm", type=float, default=2.0,
                    help="largest registration error in the head of a correctly registered session (mm)")
    ap.add_argument("--threshold", type=float, default=None, help="QC threshold (default: the shipped one)")
    ap.add_argument("--work", type=Path, default=None, help="keep the generated cohort here and reuse it")
    args = ap.parse_args()
    config = RegistrationConfig()
    limit = config.qc_max_metric if args.threshold is None else args.threshold
    raw_cfg = RegistrationConfig(highpass_sigma_mm=None)
    rows: dict[str, Scores] = {}
    wrong: list[str] = []
    errors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _cohort(args, Path(tmp))
        for sub in sorted(p.name for p in root.glob("sub-*")):
            truth = load_ground_truth(root, sub)["sessions"]
            ses0 = truth[0]["session_id"]
            native0 = sitk.ReadImage(str(_t1c(root, sub, ses0)))
            fixed = to_ras(native0, 2.0)
            fixed = image_on_grid(normalise(sitk.GetArrayFromImage(fixed)), fixed)
            fixed_label = sitk.GetArrayFromImage(resample_onto(_label(root, sub, ses0), fixed, None, True))
            head = np.argwhere(sitk.GetArrayViewFromImage(fixed) > 0.1)
            pts = np.c_[head[:, ::-1], np.ones(len(head))] @ ras_affine(fixed).T
            centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(head[:, ::-1].mean(0).tolist()))
            base_inv = np.linalg.inv(truth[0]["motion"])
            for gt in truth[1:]:
                ses = gt["session_id"]
                native = sitk.ReadImage(str(_t1c(root, sub, ses)))
                moving = to_ras(native, 2.0)
                moving = image_on_grid(normalise(sitk.GetArrayFromImage(moving)), moving)
                result = register(fixed, moving, config)
                error = _tre_max(result.to_reference_ras, pts, np.asarray(gt["motion"]) @ base_inv)
                errors.append(error)
                tags = [t for t, on in (("post-operative", gt["cavity_ml"] > 0),
                                        (f"> {LARGE_ML:g} ml", max(gt["whole_volume_ml"],
                                                                   truth[0]["whole_volume_ml"]) > LARGE_ML)) if on]
                group = f" ({', '.join(tags)})" if tags else ""
                if error > args.correct_mm:
                    wrong.append(f"{sub}/{ses}: registration error up to {error:.2f} mm")
                label = _label(root, sub, ses)
                for name, t in _spoils(result.transform, centre, args.shift_mm, args.rotate_deg).items():
                    if name == "registered" and error > args.correct_mm:
                        name = "registered, misaligned by the registration"
                    moved = image_on_grid(normalise(sitk.GetArrayFromImage(resample_onto(native, fixed, t))), fixed)
                    moved_label = sitk.GetArrayFromImage(resample_onto(label, fixed, t, True))
                    exclude = qc_exclusion([fixed_label, moved_label], (2.0, 2.0, 2.0), config.qc_exclude_margin_mm)
                    r = rows.setdefault(name + (group if name.startswith("registered") else ""), Scores())
                    r.raw.append(registration_qc(fixed, moved, raw_cfg))
                    r.highpass.append(registration_qc(fixed, moved, config))
                    r.excluded.append(registration_qc(fixed, moved, config, exclude))
    _report(args, rows, wrong, limit)
    print(f"registration error, largest in the head per session: median {np.median(errors):.2f} mm, "
          f"worst {max(errors):.2f} mm ({len(errors)} sessions)")


def _report(args: argparse.Namespace, rows: dict[str, Scores], wrong: list[str], limit: float) -> None:
    gain = f", gain {args.gain[0]:g}-{args.gain[1]:g} per visit" if args.gain else ""
    table = Table(title=f"registration QC (1 - NCC): {args.patients} {args.preset}-preset patients, seed {args.seed}"
                        f", treated fraction {args.treated_fraction:g}{gain}; threshold {limit:g}")
    for col in ("case", "n", "raw min-max", "high-pass min-max", "tumours left out min-max", f"> {limit:g}"):
        table.add_column(col)
    for name, r in sorted(rows.items(), key=lambda kv: (not kv[0].startswith("registered"), kv[0])):
        above = sum(v > limit for v in r.excluded)
        table.add_row(name, str(len(r.raw)), *(f"{min(v):.3f}-{max(v):.3f}" for v in (r.raw, r.highpass, r.excluded)),
                      str(above))
    Console(width=140).print(table)
    good = [v for k, r in rows.items() if k.startswith("registered") and "misaligned" not in k for v in r.excluded]
    bad = [v for k, r in rows.items() if not k.startswith("registered") for v in r.excluded]
    quarantined = sum(v > limit for v in good)
    caught = sum(v > limit for v in bad)
    print(f"correctly registered sessions quarantined: {quarantined}/{len(good)}; "
          f"highest score {max(good, default=float('nan')):.3f}")
    print(f"misregistered by {args.shift_mm:g} mm or {args.rotate_deg:g} deg caught: {caught}/{len(bad)} "
          f"({100.0 * caught / max(len(bad), 1):.1f} %); lowest score {min(bad, default=float('nan')):.3f}")
    for line in wrong:
        print(f"not counted as correctly registered (error > {args.correct_mm:g} mm): {line}")


if __name__ == "__main__":
    main()
