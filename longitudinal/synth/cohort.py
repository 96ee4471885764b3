"""The synthetic longitudinal glioma cohort: draw patients, grow tumours, render visits, write BIDS.

Layout written under ``out``::

    dataset_description.json  participants.tsv  participants.json  README  <channel sidecars>.json
    sub-001/sub-001_sessions.tsv                          session_id, acq_time (ISO 8601)
    sub-001/ses-01/anat/sub-001_ses-01_ce-gd_T1w.nii.gz   T1c (names from the BIDS channel map)
    sub-001/ses-01/anat/sub-001_ses-01_FLAIR.nii.gz       FLAIR
    derivatives/labels/sub-001/ses-01/anat/sub-001_ses-01_dseg.nii.gz   0 bg, 1 oedema, 2 core (moved space)
    derivatives/groundtruth/sub-001/params.json           D_w, rho, seed, thresholds, silent period, dates
    derivatives/groundtruth/sub-001/sessions.json         days, motion M (p_moved = M p_true), true volumes
    derivatives/groundtruth/sub-001/ses-01_density.nii.gz unmoved density c
    derivatives/groundtruth/volumes.tsv                   every (subject, session) with its true volumes

Every patient has its own random stream seeded by (seed, patient index), so a cohort is a pure function of
(n_patients, seed, preset) and patient k is the same whatever n_patients is.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from longitudinal.synth.anatomy import Anatomy, diffusivity_map, load_anatomy
from longitudinal.synth.config import SynthPreset, get_preset
from longitudinal.synth.motion import apply_motion, random_motion
from longitudinal.synth.render import (
    Thresholds,
    bias_field,
    label_map,
    render_clean,
    rician,
    to_int16,
    white_matter_level,
)
from longitudinal.synth.solver import FisherKolmogorov

GENERATOR_NAME = "longitudinal synth"
BIDS_VERSION = "1.9.0"
# BIDS filename entity order (subset that a channel map may use); the suffix comes last.
_ENTITY_ORDER = ("task", "acq", "ce", "trc", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part")
_MAX_ATTEMPTS = 200


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class PatientSummary:
    """One row of the cohort summary. Volumes in ml, D_w in mm^2/day, rho in 1/day."""

    subject: str
    n_visits: int
    min_whole_ml: float
    max_whole_ml: float
    d_white: float
    rho: float


@dataclass
class CohortSummary:
    """What ``generate_cohort`` wrote: the BIDS root, how, and one row per patient."""

    out: Path
    preset: str
    seed: int
    patients: list[PatientSummary] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    @property
    def n_visits(self) -> int:
        return sum(p.n_visits for p in self.patients)

    @property
    def volume_range_ml(self) -> tuple[float, float]:
        """(smallest, largest) whole-tumour volume over every visit (ml); (nan, nan) when empty."""
        if not self.patients:
            return (math.nan, math.nan)
        return (min(p.min_whole_ml for p in self.patients), max(p.max_whole_ml for p in self.patients))


@dataclass
class _Visit:
    session: str
    acq_time: datetime
    days: float
    density_box: np.ndarray  # c on the solver box, float32
    whole_ml: float
    core_ml: float
    burden_ml: float


@dataclass
class _Patient:
    subject: str
    d_white: float
    rho: float
    seed_voxel: tuple[int, int, int]
    seed_mm: list[float]
    thresholds: Thresholds
    silent_days: float
    baseline_volume_target_ml: float
    box: tuple[slice, slice, slice]
    visits: list[_Visit]
    attempts: int


# ------------------------------------------------------------------------------------------------ naming
def bids_filename(subject: str, session: str, entities: Mapping[str, str], extension: str = ".nii.gz") -> str:
    """``sub-<s>_ses-<t>[_<entity>-<value>...]_<suffix><ext>`` from a channel map entry.

    entities: BIDS entities of one channel, e.g. {"suffix": "T1w", "ce": "gd"}; "suffix" is required.
    subject/session are labels without prefix ("001", "01").
    """
    if "suffix" not in entities:
        raise ValueError(f"channel entities need a 'suffix', got {dict(entities)}")
    unknown = sorted(set(entities) - set(_ENTITY_ORDER) - {"suffix", "extension", "datatype"})
    if unknown:
        raise ValueError(f"unsupported BIDS entities {unknown}; supported: {', '.join(_ENTITY_ORDER)}")
    parts = [f"sub-{subject}", f"ses-{session}"]
    parts += [f"{k}-{entities[k]}" for k in _ENTITY_ORDER if k in entities]
    return "_".join(parts) + f"_{entities['suffix']}{extension}"


def _default_channel_map() -> dict[str, dict[str, str]]:
    from longitudinal.settings import DEFAULT_BIDS_CHANNEL_MAP

    return {k: dict(v) for k, v in DEFAULT_BIDS_CHANNEL_MAP.items()}


# ------------------------------------------------------------------------------------------------ physics
def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _solver_box(anatomy: Anatomy, seed: tuple[int, int, int], half_width_mm: float) -> tuple[slice, ...]:
    half = int(math.ceil(half_width_mm / anatomy.spacing_mm))
    return tuple(
        slice(max(0, s - half), min(n, s + half + 1)) for s, n in zip(seed, anatomy.shape, strict=True)
    )


def _edge_max(c: np.ndarray) -> float:
    """Largest density on the six faces of the solver box (c must be ~0 there: the box holds the tumour)."""
    return float(max(c[0].max(), c[-1].max(), c[:, 0].max(), c[:, -1].max(), c[:, :, 0].max(), c[:, :, -1].max()))


def _draw_patient(index: int, seed: int, preset: SynthPreset, anatomy: Anatomy) -> _Patient:
    """Draw one patient and grow its tumour; rejection keeps every visit within the preset's volume bounds."""
    rng = np.random.default_rng([seed, index])
    subject = f"{index + 1:03d}"
    voxel_ml = anatomy.voxel_ml
    seeds = np.argwhere((anatomy.wm >= 0.9) & anatomy.parenchyma)
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        n_visits = int(rng.integers(preset.visits[0], preset.visits[1] + 1))
        n_gaps = n_visits - 1
        (g_min, g_max), (a_min, a_max) = preset.gap_days, preset.radial_growth_mm
        # The front advances 2 sqrt(D rho) mm/day (Fisher-KPP speed); over the observation window it must move
        # a_min..a_max mm so that the tumour visibly grows but stays below max_volume_ml. Half the patients get
        # their follow-up schedule first and then parameters that fit it (slow tumours, long horizons); the
        # other half get parameters first and then a schedule that fits them (fast tumours, close visits).
        schedule_first = bool(rng.random() < 0.5)
        gaps = rng.integers(g_min, g_max + 1, size=n_gaps) if schedule_first else None
        window = (float(gaps.sum()),) * 2 if gaps is not None else (g_min * n_gaps, g_max * n_gaps)
        for _ in range(2000):
            d_white = _log_uniform(rng, preset.d_white)
            rho = _log_uniform(rng, preset.rho)
            speed = 2.0 * math.sqrt(d_white * rho)
            if a_min / window[1] <= speed <= a_max / window[0]:
                break
        else:
            continue
        if gaps is None:
            lo = max(math.ceil(a_min / speed / n_gaps), g_min)
            hi = min(math.floor(a_max / speed / n_gaps), g_max)
            if lo > hi:
                continue
            gaps = rng.integers(lo, hi + 1, size=n_gaps)
        thresholds = Thresholds(
            flair=float(rng.uniform(*preset.flair_threshold)),
            enhancing=float(rng.uniform(*preset.enhancing_threshold)),
            necrosis=float(rng.uniform(*preset.necrosis_threshold)),
        )
        v0 = _log_uniform(rng, preset.baseline_volume_ml)
        seed_voxel = tuple(int(v) for v in seeds[rng.integers(len(seeds))])
        box = _solver_box(anatomy, seed_voxel, preset.solver_half_width_mm)
        solver = FisherKolmogorov(
            diffusivity_map(anatomy, d_white)[box],
            anatomy.parenchyma[box],
            anatomy.spacing_mm,
            rho,
            dt_safety=preset.dt_safety,
            max_dt_rho=preset.max_dt_rho,
        )
        # The silent period starts from a dense cluster of radius 4 mm (0.27 ml), below the smallest visible
        # volume; a dense start gives a mature profile (c -> 1 behind the front) as real tumours show.
        grids = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
        r2 = sum((g - s) ** 2 for g, s in zip(grids, seed_voxel, strict=True)) * anatomy.spacing_mm**2
        c = solver.initial((r2 <= max(4.0, anatomy.spacing_mm) ** 2).astype(np.float32))

        def visible(state: np.ndarray, thr: float = thresholds.flair, target: float = v0) -> bool:
            return np.count_nonzero(state >= thr) * voxel_ml >= target

        silent = solver.advance_until(c, visible, preset.max_silent_days)
        if silent is None or silent < preset.min_silent_days:
            continue
        baseline = datetime(2012, 1, 1) + timedelta(days=int(rng.integers(0, 12 * 365)))
        offsets = np.concatenate([[0], np.cumsum(gaps)])
        acq_times = [
            baseline + timedelta(days=int(d), minutes=int(rng.integers(8 * 60, 18 * 60))) for d in offsets
        ]
        visits: list[_Visit] = []
        t_now = 0.0
        for k, acq in enumerate(acq_times):
            days = (acq - acq_times[0]).total_seconds() / 86400.0
            solver.advance(c, days - t_now)
            t_now = days
            whole = np.count_nonzero(c >= thresholds.flair) * voxel_ml
            if whole > preset.max_volume_ml:
                break
            visits.append(
                _Visit(
                    session=f"{k + 1:02d}",
                    acq_time=acq,
                    days=days,
                    density_box=c.copy(),
                    whole_ml=float(whole),
                    core_ml=float(np.count_nonzero(c >= thresholds.enhancing) * voxel_ml),
                    burden_ml=float(c.sum(dtype=np.float64) * voxel_ml),
                )
            )
        if len(visits) < min(3, preset.visits[0]):
            continue
        if _edge_max(visits[-1].density_box) > thresholds.flair / 2.0:
            continue  # the tumour reached the edge of the solver box: the box would have clipped it
        seed_mm = (anatomy.affine @ np.array([*seed_voxel, 1.0]))[:3].tolist()
        return _Patient(
            subject=subject,
            d_white=d_white,
            rho=rho,
            seed_voxel=seed_voxel,  # type: ignore[arg-type]
            seed_mm=[float(v) for v in seed_mm],
            thresholds=thresholds,
            silent_days=float(silent),
            baseline_volume_target_ml=v0,
            box=box,  # type: ignore[arg-type]
            visits=visits,
            attempts=attempt,
        )
    raise RuntimeError(f"could not draw patient {subject} within {_MAX_ATTEMPTS} attempts (preset {preset.name})")


# ------------------------------------------------------------------------------------------------ writing
def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_patient(out: Path, patient: _Patient, anatomy: Anatomy, preset: SynthPreset,
                   channel_map: Mapping[str, Mapping[str, str]], seed: int, index: int) -> None:
    # A separate stream for rendering, so imaging choices never change the drawn physics.
    rng = np.random.default_rng([seed, index, 1])
    sub = patient.subject
    noise_sigma = float(rng.uniform(*preset.noise_fraction)) * white_matter_level(anatomy)
    centre_mm = (anatomy.affine @ np.array([*(np.array(anatomy.shape) - 1) / 2.0, 1.0]))[:3]
    gt_dir = out / "derivatives" / "groundtruth" / f"sub-{sub}"
    sessions_gt = []
    rows = ["session_id\tacq_time"]
    for visit in patient.visits:
        ses = visit.session
        c = np.zeros(anatomy.shape, dtype=np.float32)
        c[patient.box] = visit.density_box
        motion = random_motion(rng, preset.rotation_deg, preset.translation_mm, centre_mm)
        clean = render_clean(anatomy, c, patient.thresholds)
        bias = bias_field(rng, anatomy, preset.bias_strength)
        anat = out / f"sub-{sub}" / f"ses-{ses}" / "anat"
        for channel in ("T1c", "FLAIR"):
            if channel not in channel_map:
                raise ValueError(f"BIDS channel map lacks channel {channel!r}: {dict(channel_map)}")
            moved = apply_motion(clean[channel], anatomy.affine, motion, order=1)
            image = rician(rng, moved * bias, noise_sigma)
            _write_nifti(anat / bids_filename(sub, ses, channel_map[channel]), to_int16(image), anatomy.affine)
        moved_c = apply_motion(c, anatomy.affine, motion, order=1)
        labels = label_map(moved_c, patient.thresholds)
        _write_nifti(
            out / "derivatives" / "labels" / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_dseg.nii.gz",
            labels,
            anatomy.affine,
        )
        _write_nifti(gt_dir / f"ses-{ses}_density.nii.gz", c, anatomy.affine)
        rows.append(f"ses-{ses}\t{visit.acq_time.isoformat(timespec='seconds')}")
        sessions_gt.append(
            {
                "session_id": f"ses-{ses}",
                "acq_time": visit.acq_time.isoformat(timespec="seconds"),
                "days_since_baseline": visit.days,
                "days_since_onset": visit.days + patient.silent_days,
                "motion": motion.tolist(),
                "whole_volume_ml": visit.whole_ml,
                "enhancing_volume_ml": visit.core_ml,
                "total_burden_ml": visit.burden_ml,
            }
        )
    (out / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
    (out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_text("\n".join(rows) + "\n")
    t = patient.thresholds
    _write_json(
        gt_dir / "params.json",
        {
            "subject": f"sub-{sub}",
            "model": "Fisher-Kolmogorov dc/dt = div(D grad c) + rho c (1 - c), no flux out of the parenchyma",
            "d_white_mm2_per_day": patient.d_white,
            "d_grey_mm2_per_day": patient.d_white / 10.0,
            "rho_per_day": patient.rho,
            "front_speed_mm_per_day": 2.0 * math.sqrt(patient.d_white * patient.rho),
            "seed_point_mm": patient.seed_mm,
            "seed_voxel": list(patient.seed_voxel),
            "thresholds": {"flair": t.flair, "enhancing": t.enhancing, "necrosis": t.necrosis},
            "silent_period_days": patient.silent_days,
            "baseline_volume_target_ml": patient.baseline_volume_target_ml,
            "baseline_date": patient.visits[0].acq_time.date().isoformat(),
            "baseline_acq_time": patient.visits[0].acq_time.isoformat(timespec="seconds"),
            "noise_sigma": noise_sigma,
            "spacing_mm": anatomy.spacing_mm,
            "preset": preset.name,
            "cohort_seed": seed,
            "patient_index": index,
            "draw_attempts": patient.attempts,
            "motion_convention": "4x4 RAS mm, p_moved = M @ p_true; header affines stay nominal",
            "labels": {"0": "background", "1": "oedema/non-enhancing", "2": "enhancing core (incl. necrosis)"},
        },
    )
    _write_json(gt_dir / "sessions.json", sessions_gt)


def _write_dataset_files(out: Path, summary: CohortSummary, channel_map: Mapping[str, Mapping[str, str]]) -> None:
    generated_by = [{"Name": GENERATOR_NAME, "Description": f"preset={summary.preset} seed={summary.seed}"}]
    _write_json(
        out / "dataset_description.json",
        {
            "Name": "Synthetic longitudinal glioma cohort",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["longitudinal synth generator"],
            "GeneratedBy": generated_by,
        },
    )
    for name, desc in (("labels", "Tumour labels in each visit's (moved) space"),
                       ("groundtruth", "Generator ground truth: parameters, motion, unmoved density, volumes")):
        _write_json(
            out / "derivatives" / name / "dataset_description.json",
            {
                "Name": desc,
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": generated_by,
            },
        )
    (out / "derivatives" / "labels" / "dseg.tsv").write_text(
        "index\tname\tabbreviation\n0\tbackground\tBG\n1\toedema/non-enhancing\tED\n2\tenhancing core\tET\n"
    )
    (out / "participants.tsv").write_text(
        "participant_id\tgroup\n" + "".join(f"sub-{p.subject}\tsynthetic_glioma\n" for p in summary.patients)
    )
    _write_json(
        out / "participants.json",
        {"group": {"Description": "cohort group", "Levels": {"synthetic_glioma": "simulated glioma patient"}}},
    )
    # Inherited sidecars (top level applies to every subject and session).
    sidecars = {"T1c": {"ContrastBolusIngredient": "GADOLINIUM", "MRAcquisitionType": "3D"},
                "FLAIR": {"MRAcquisitionType": "3D"}}
    for channel, meta in sidecars.items():
        ents = channel_map[channel]
        stem = "_".join([f"{k}-{ents[k]}" for k in _ENTITY_ORDER if k in ents] + [ents["suffix"]])
        _write_json(out / f"{stem}.json", meta)
    (out / "README").write_text(
        "Synthetic longitudinal glioma cohort\n"
        "====================================\n\n"
        "Generated by `longitudinal synth` (Fisher-Kolmogorov growth on the MNI152 anatomy shipped with nilearn).\n"
        f"Preset {summary.preset}, seed {summary.seed}, {summary.n_patients} patients, {summary.n_visits} visits.\n\n"
        "Each visit has a post-contrast T1-like image (ce-gd_T1w) and a FLAIR-like image. Head motion moves the\n"
        "image content while the header affine stays the nominal MNI affine, so visits must be registered.\n"
        "derivatives/labels holds labels in each visit's space (0 background, 1 oedema, 2 enhancing core);\n"
        "derivatives/groundtruth holds the parameters, the exact motion (p_moved = M p_true, RAS mm), the\n"
        "unmoved densities and the true volumes (volumes.tsv).\n"
    )
    lines = ["participant_id\tsession_id\tdays_since_baseline\twhole_volume_ml\tenhancing_volume_ml\ttotal_burden_ml"]
    for p in summary.patients:
        for s in load_ground_truth(out, p.subject)["sessions"]:
            lines.append(
                f"sub-{p.subject}\t{s['session_id']}\t{s['days_since_baseline']:.6f}\t{s['whole_volume_ml']:.4f}"
                f"\t{s['enhancing_volume_ml']:.4f}\t{s['total_burden_ml']:.4f}"
            )
    (out / "derivatives" / "groundtruth" / "volumes.tsv").write_text("\n".join(lines) + "\n")


def _prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier synth cohort; clear an earlier one."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    desc = out / "dataset_description.json"
    try:
        ours = any(g.get("Name") == GENERATOR_NAME for g in json.loads(desc.read_text()).get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{out} is not empty and is not a cohort written by {GENERATOR_NAME}; refusing to write")
    for child in out.iterdir():
        if child.is_dir() and (child.name.startswith("sub-") or child.name == "derivatives"):
            shutil.rmtree(child)


# ------------------------------------------------------------------------------------------------ public
def generate_cohort(
    out: Path,
    n_patients: int,
    seed: int,
    preset: str = "default",
    progress: Callable[[int, int], None] | None = None,
    *,
    channel_map: Mapping[str, Mapping[str, str]] | None = None,
) -> CohortSummary:
    """Write a synthetic longitudinal glioma cohort as a BIDS dataset under ``out``.

    n_patients: number of subjects (>= 1); seed: cohort seed (same seed -> same arrays); preset: "tiny" |
    "default" (see ``longitudinal.synth.config.PRESETS``). progress(done, total) is called after each patient.
    channel_map: project channel -> BIDS entities (default: ``Settings.bids_channel_map`` defaults); it names
    the files. An earlier synth cohort in ``out`` is replaced; any other non-empty folder is refused.
    Returns a CohortSummary (volumes in ml).
    """
    problems = []
    if not isinstance(n_patients, int) or n_patients < 1:
        problems.append(f"n_patients must be an integer >= 1, got {n_patients!r}")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be an integer >= 0, got {seed!r}")
    try:
        cfg = get_preset(preset)
    except ValueError as exc:
        problems.append(str(exc))
    cmap = {k: dict(v) for k, v in (channel_map or _default_channel_map()).items()}
    missing = [ch for ch in ("T1c", "FLAIR") if ch not in cmap]
    if missing:
        problems.append(f"channel map lacks {missing}; it has {sorted(cmap)}")
    for ch, ents in cmap.items():
        try:
            bids_filename("x", "y", ents)
        except ValueError as exc:
            problems.append(f"channel {ch}: {exc}")
    if problems:
        raise ValueError("cannot generate the synthetic cohort:\n  " + "\n  ".join(problems))

    start = time.perf_counter()
    out = Path(out)
    _prepare_out(out)
    anatomy = load_anatomy(cfg.spacing_mm)
    summary = CohortSummary(out=out, preset=cfg.name, seed=seed)
    if progress:
        progress(0, n_patients)
    for index in range(n_patients):
        patient = _draw_patient(index, seed, cfg, anatomy)
        _write_patient(out, patient, anatomy, cfg, cmap, seed, index)
        whole = [v.whole_ml for v in patient.visits]
        summary.patients.append(
            PatientSummary(
                subject=patient.subject,
                n_visits=len(patient.visits),
                min_whole_ml=min(whole),
                max_whole_ml=max(whole),
                d_white=patient.d_white,
                rho=patient.rho,
            )
        )
        if progress:
            progress(index + 1, n_patients)
    _write_dataset_files(out, summary, cmap)
    summary.seconds = time.perf_counter() - start
    return summary


def load_ground_truth(bids_root: Path, subject: str) -> dict:
    """Ground truth of one subject ("001" or "sub-001") of a synth cohort.

    Returns {"subject": "sub-001", "params": <params.json>, "sessions": [...]} where each session dict has
    session_id, acq_time, days_since_baseline (days), motion (4x4 numpy, RAS mm, p_moved = M @ p_true),
    whole_volume_ml, enhancing_volume_ml, total_burden_ml and density_path (Path of the unmoved c NIfTI).
    """
    label = subject.removeprefix("sub-")
    gt = Path(bids_root) / "derivatives" / "groundtruth" / f"sub-{label}"
    if not gt.is_dir():
        raise FileNotFoundError(f"no ground truth for sub-{label} under {gt}")
    params = json.loads((gt / "params.json").read_text())
    sessions = json.loads((gt / "sessions.json").read_text())
    for s in sessions:
        s["motion"] = np.asarray(s["motion"], dtype=np.float64)
        s["density_path"] = gt / f"{s['session_id']}_density.nii.gz"
    return {"subject": f"sub-{label}", "params": params, "sessions": sessions}


def patient_summary_dict(p: PatientSummary) -> dict:
    """A PatientSummary as a plain dict (for tables and JSON)."""
    return asdict(p)
