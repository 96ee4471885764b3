"""After training: choose, per horizon and treatment stratum, whether the model or a simple baseline serves
(``predict.serving``).

The trained checkpoint, ``lci`` and ``linear`` forecast the validation targets (as many as the calibration uses,
``TrainConfig.calib_targets``) through the one Predictor; the policy fitted on those records is written into the
checkpoint (``provenance["serving"]``) before its volume intervals are calibrated, so the calibration is fitted
on the forecasts that will be served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from longitudinal.models.base import build_model
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.predict import Predictor
from longitudinal.predict.serving import MIN_STRATUM_TARGETS, ServingPolicy, fit_serving_policy
from longitudinal.training.config import TrainConfig
from longitudinal.training.validation import ValidationSet, calibration_eval_config, weights_digest

# Names the choosing rule: checkpoints chosen for by an older rule (one choice per horizon for every query)
# choose again.
SERVING_RULE = f"per-stratum-min{MIN_STRATUM_TARGETS}"
# (weights digest, validation targets) -> the policy fitted for them in this process.
_FITTED: dict[tuple[str, tuple[object, ...]], ServingPolicy] = {}


def fit_serving(path: Path, val: ValidationSet, config: TrainConfig, device: torch.device,
                say: Callable[[str], None] = lambda _m: None) -> ServingPolicy | None:
    """Fit the serving policy of the checkpoint at ``path`` on the validation targets ``val`` and save it into
    the checkpoint (atomically). None (and the checkpoint unchanged) when there are no validation targets."""
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_items

    if not val:
        return None
    ckpt = Checkpoint.load(path)
    # What the choice was fitted on: a checkpoint chosen for at this step on the same targets keeps its choice
    # (a finished run resumed by a later call does not choose, or calibrate, again).
    fit_key = {"step": ckpt.provenance.get("step"), "targets": len(val.items),
               "patients": sorted({it.patient_id for it in val.items}), "rule": SERVING_RULE}
    if ckpt.provenance.get("serving") and ckpt.provenance.get("serving_fit") == fit_key:
        return ServingPolicy.from_meta(ckpt.provenance["serving"])
    memo = (weights_digest(ckpt), tuple(it for it in val.items))
    if memo in _FITTED:  # the final model often is the best one: the same weights choose the same way
        policy = _FITTED[memo]
        replace(ckpt, provenance={**ckpt.provenance, "serving": policy.to_meta(), "serving_fit": fit_key}).save(path)
        say(f"served per horizon ({path.name}, same weights as a checkpoint chosen for before): {policy.describe()}")
        return policy
    ecfg = calibration_eval_config(config, device)
    # The model's own forecasts choose: no earlier policy, no calibration (intervals do not enter the choice).
    model = Predictor(ckpt.build(), ckpt.crop_size, ckpt.data, ckpt.channels, ckpt.spacing_mm, device)
    model.model.volume_calibration = None
    predictors = {"model": model, "lci": model.like(build_model("lci")), "linear": model.like(build_model("linear"))}
    say(f"choosing, per horizon, the model or a baseline on {len(val.items)} validation targets")
    report = evaluate_items(predictors, val.series, val.items, ecfg,
                            progress=lambda m: say(f"serving choice: {m}"))
    edges = [hi for _lo, hi in HORIZON_BINS[:-1]]
    policy = fit_serving_policy(report.records, {k: k for k in predictors}, edges)
    _FITTED[memo] = policy
    replace(ckpt, provenance={**ckpt.provenance, "serving": policy.to_meta(), "serving_fit": fit_key}).save(path)
    say(f"served per horizon ({path.name}): {policy.describe()}")
    return policy
