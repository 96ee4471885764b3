"""Synthetic longitudinal glioma cohort: Fisher-Kolmogorov growth on the MNI152 anatomy, written as BIDS (or in
the LUMIERE layout: ``write_lumiere_cohort``).

Public API: ``generate_cohort``, ``load_ground_truth``, ``write_lumiere_cohort``, ``load_lumiere_ground_truth``,
``apply_motion`` / ``undo_motion``, the presets and the solver (``FisherKolmogorov``) for tests and the
mechanistic baseline.
"""

from longitudinal.synth.cohort import (
    CohortSummary,
    PatientSummary,
    bids_filename,
    generate_cohort,
    load_ground_truth,
)
from longitudinal.synth.config import PRESETS, SynthPreset, get_preset
from longitudinal.synth.lumiere import (
    LumiereCohort,
    Schedule,
    load_lumiere_ground_truth,
    lumiere_schedule,
    write_lumiere_cohort,
)
from longitudinal.synth.motion import apply_motion, rigid_matrix, undo_motion
from longitudinal.synth.render import Thresholds, label_map, render_clean
from longitudinal.synth.solver import FisherKolmogorov

__all__ = [
    "PRESETS",
    "CohortSummary",
    "FisherKolmogorov",
    "LumiereCohort",
    "PatientSummary",
    "Schedule",
    "SynthPreset",
    "Thresholds",
    "apply_motion",
    "bids_filename",
    "generate_cohort",
    "get_preset",
    "label_map",
    "load_ground_truth",
    "load_lumiere_ground_truth",
    "lumiere_schedule",
    "render_clean",
    "rigid_matrix",
    "undo_motion",
    "write_lumiere_cohort",
]
