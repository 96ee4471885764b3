"""Typed presets of the synthetic cohort generator.

A preset fixes the grid, the field of view of the growth solver, the visit scheme and the parameter ranges.
All lengths are mm, all times days, diffusivities mm^2/day, proliferation rates 1/day.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthPreset:
    """One generator preset.

    spacing_mm: isotropic voxel size of the written images (2 = MNI152 2 mm grid; 4 = that grid block-averaged).
    solver_half_width_mm: half side of the cube around the seed on which growth is solved; outside it c = 0.
        It must hold a 150 ml tumour plus its diffuse tail (checked per patient, see patients.py).
    visits: inclusive range of the number of visits per patient.
    gap_days: inclusive range of the integer day gap between consecutive visits.
    d_white: range of the white-matter diffusivity D_w (mm^2/day), drawn log-uniform; grey matter gets D_w/10.
    rho: range of the proliferation rate (1/day), drawn log-uniform.
    baseline_volume_ml: whole-tumour volume at the first scan (log-uniform); it ends the silent period.
    max_volume_ml: no visit may show a larger whole tumour (later visits are dropped, or the draw is rejected).
    radial_growth_mm: admissible front advance 2*sqrt(D_w*rho) * window over the observation window; a cheap
        pre-filter so that the tumour visibly grows but stays below max_volume_ml.
    flair_threshold, enhancing_threshold, necrosis_threshold: per-patient ranges of the thresholds on c.
    rotation_deg, translation_mm: per-visit rigid head motion, each axis uniform in +-value.
    noise_fraction: Rician noise sigma as a fraction of the white-matter intensity (range).
    bias_strength: standard deviation of the log bias-field coefficients.
    dt_safety: fraction of the explicit-diffusion stability limit used as the time step.
    max_dt_rho: upper bound on dt * rho (splitting accuracy of the reaction step).
    min_silent_days: a draw whose tumour is visible sooner is rejected (a silent period precedes the first scan).
    max_silent_days: a draw whose tumour needs longer than this to become visible is rejected.

    Treatment (a treated patient, see ``treatment.py``; days count from the baseline scan, which precedes
    surgery): surgery_day, postop_scan_days (after surgery), rt_delay_days (surgery to the first fraction),
    followup_delay_days (last fraction to the first follow-up scan) and followup_gap_days: inclusive integer
    ranges. resection_margin_mm: margin resected around the enhancing core. rt_fractions x rt_dose_gy over
    weekdays; rt_alpha (1/Gy, log-uniform) with rt_alpha_beta_gy = alpha/beta of the linear-quadratic model;
    rt_margin_mm: the irradiated field around the visible tumour and the cavity. treated_rho: the range of rho
    drawn for a treated patient (treatment is given to the faster, high-grade tumours; a slow one would not be
    seen to regrow within its follow-up). chemo_effect: fraction by which
    rho drops while on temozolomide (concomitant with radiotherapy; adjuvant, with probability
    adjuvant_probability, for adjuvant_cycles x 28 days starting 28 days after radiotherapy).
    """

    name: str
    spacing_mm: float
    solver_half_width_mm: float
    visits: tuple[int, int]
    gap_days: tuple[int, int] = (30, 180)
    d_white: tuple[float, float] = (0.02, 1.5)
    rho: tuple[float, float] = (0.005, 0.2)
    baseline_volume_ml: tuple[float, float] = (1.5, 15.0)
    max_volume_ml: float = 150.0
    radial_growth_mm: tuple[float, float] = (4.0, 30.0)
    flair_threshold: tuple[float, float] = (0.05, 0.4)
    enhancing_threshold: tuple[float, float] = (0.5, 0.85)
    necrosis_threshold: tuple[float, float] = (0.93, 0.985)
    rotation_deg: float = 4.0
    translation_mm: float = 4.0
    noise_fraction: tuple[float, float] = (0.02, 0.04)
    bias_strength: float = 0.08
    dt_safety: float = 0.9
    max_dt_rho: float = 0.1
    min_silent_days: float = 30.0
    max_silent_days: float = 4000.0
    surgery_day: tuple[int, int] = (3, 10)
    postop_scan_days: tuple[int, int] = (1, 3)
    rt_delay_days: tuple[int, int] = (21, 35)
    followup_delay_days: tuple[int, int] = (21, 42)
    followup_gap_days: tuple[int, int] = (60, 90)
    resection_margin_mm: tuple[float, float] = (4.0, 8.0)
    rt_fractions: int = 30
    rt_dose_gy: float = 2.0
    rt_alpha: tuple[float, float] = (0.02, 0.08)
    rt_alpha_beta_gy: float = 10.0
    rt_margin_mm: float = 20.0
    treated_rho: tuple[float, float] = (0.03, 0.2)
    chemo_effect: tuple[float, float] = (0.3, 0.8)
    adjuvant_probability: float = 0.7
    adjuvant_cycles: int = 6


PRESETS: dict[str, SynthPreset] = {
    # 4 mm grid (the 2 mm atlas block-averaged): about a second per patient, for tests.
    "tiny": SynthPreset(name="tiny", spacing_mm=4.0, solver_half_width_mm=64.0, visits=(3, 5)),
    # The MNI152 2 mm grid: the cohort the demo and the pipeline use.
    "default": SynthPreset(name="default", spacing_mm=2.0, solver_half_width_mm=64.0, visits=(3, 8)),
    # A stress test of registration and its QC on the 2 mm grid: large tumours that grow past 150 ml (a wider
    # solver box holds them), wide resection margins (big cavities when treated) and strong per-visit bias
    # fields, whose quadratic terms also change each visit's overall gain.
    "hard": SynthPreset(name="hard", spacing_mm=2.0, solver_half_width_mm=90.0, visits=(4, 6),
                        baseline_volume_ml=(20.0, 80.0), max_volume_ml=350.0, radial_growth_mm=(15.0, 45.0),
                        resection_margin_mm=(6.0, 12.0), bias_strength=0.15),
}


def get_preset(name: str) -> SynthPreset:
    """The preset called ``name``; the error lists the valid choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown synth preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
