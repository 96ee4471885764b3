"""Refit the volume-interval calibration of a finished run on more held-out patients, without retraining.

Training calibrates a sampled model on its validation split, which is small (15% of the cohort: 19 patients of
128), and per-bin coverage rests on the number of calibration *patients* (``benchmarks/calibration_study.py heldout``
measures how much it moves with 10, 19 and 40 of them). Patients who arrive after training, or a site's own
held-out patients, can calibrate the same weights: this module rewrites ``meta["volume_calibration"]`` of the
run's ``checkpoints/best.pt`` and ``model.pt`` from the patients given, through the same path as the
end-of-training calibration (``fit.calibrate_checkpoint``).

Calibration patients must be held out from the weights: the run's training patients are refused, and so are its
test patients (their figures would no longer be held out). Each checkpoint is rewritten atomically; if the
second one fails, running the command again finishes it (a checkpoint already calibrated on the same patients
and settings is left as it is).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from longitudinal.data.splits import Split
from longitudinal.models.calibration import VolumeCalibration
from longitudinal.training.config import TrainConfig
from longitudinal.training.validation import calibrate_checkpoint


@dataclass(frozen=True)
class Recalibration:
    """The checkpoints rewritten and the whole-tumour calibration they now carry (n targets, n_patients)."""

    checkpoints: tuple[Path, ...]
    whole: VolumeCalibration


def recalibrate_run(run_dir: Path, store_url: str, patient_ids: Sequence[str], max_targets: int | None = None,
                    device: str = "auto", progress: Callable[[str], None] | None = None,
                    form: str | None = None) -> Recalibration:
    """Calibrate the checkpoints of ``run_dir`` (a ``fit`` run folder) on ``patient_ids`` of ``store_url``.

    max_targets: at most this many targets, evenly spaced over the patients' targets (default: the run's
    ``calib_targets``). form: ``"scaled"`` or ``"symmetric"`` conformal scores (default: the run's
    ``calib_form``; ``longitudinal.models.calibration``). Raises ValueError listing every problem found before
    any forecast: no checkpoint, config or split; empty, duplicated, unknown, training or test patients; no
    target cap; an unknown form. A model that is not sampled is refused by ``fit_volume_calibration`` before
    anything is written."""
    from longitudinal.predict import resolve_device
    from storage.store import CohortStore

    run_dir = Path(run_dir)
    problems = []
    paths = [p for p in (run_dir / "checkpoints" / "best.pt", run_dir / "model.pt") if p.exists()]
    if not paths:
        problems.append(f"{run_dir}: no checkpoints/best.pt or model.pt (not a finished training run)")
    config = split = None
    try:
        config = TrainConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        problems.append(f"{run_dir / 'config.json'}: {exc}")
    try:
        split = Split.load(run_dir / "split.json")
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"{run_dir / 'split.json'}: {exc}")
    pids = [str(p) for p in patient_ids]
    if not pids:
        problems.append("no calibration patients given")
    if len(set(pids)) != len(pids):
        problems.append(f"patients listed twice: {sorted({p for p in pids if pids.count(p) > 1})}")
    if split is not None:
        for part in ("train", "test"):
            both = sorted(set(pids) & set(getattr(split, part)))
            if both:
                problems.append(f"{len(both)} patients are in the run's {part} split, not held out: {both}")
    if form is not None and form not in ("scaled", "symmetric"):
        problems.append(f"form must be 'scaled' or 'symmetric', got {form!r}")
    if max_targets is not None and max_targets < 1:
        problems.append(f"max_targets must be >= 1, got {max_targets}")
    elif max_targets is None and config is not None and config.calib_targets < 1:
        problems.append("the run's calib_targets is 0 (calibration was off); give max_targets (--targets)")
    try:
        known = set(CohortStore.open(store_url).patient_ids())
        unknown = sorted(set(pids) - known)
        if unknown:
            problems.append(f"patients not in the store {store_url}: {unknown}")
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"cannot open the store {store_url}: {exc}")
    if problems:
        raise ValueError(f"cannot recalibrate {run_dir}:\n  " + "\n  ".join(problems))
    assert config is not None
    # A deterministic model is refused by fit_volume_calibration ("only sampled models get a volume calibration").
    cfg = config.model_copy(update={"calib_targets": max_targets or config.calib_targets,
                                    "calib_form": form or config.calib_form})
    say = progress or (lambda _m: None)
    dev = resolve_device(device)
    cals = [calibrate_checkpoint(path, store_url, pids, cfg, dev, say) for path in paths]
    return Recalibration(tuple(paths), cals[0]["whole"])
