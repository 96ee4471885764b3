"""TrainConfig: everything a training run needs besides the store and the run folder. Validated at the boundary
(pydantic, every problem reported at once); loads from YAML or JSON; ``DEFAULT_TRAIN_CONFIG`` is the tuned
default that ``longitudinal train`` and the quality benchmark use as is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from longitudinal.data.augment import AugmentConfig
from longitudinal.data.dataset import DataConfig


class AugmentSettings(BaseModel):
    """Mirror of `longitudinal.data.augment.AugmentConfig` (probabilities, radians, fractions)."""

    model_config = ConfigDict(extra="forbid")
    flip_prob: float = Field(0.5, ge=0, le=1)
    affine_prob: float = Field(0.25, ge=0, le=1)
    rotate_rad: float = Field(0.15, ge=0)
    scale: float = Field(0.1, ge=0, lt=1)
    intensity_scale: float = Field(0.1, ge=0, lt=1)
    intensity_prob: float = Field(0.3, ge=0, le=1)


class TrainConfig(BaseModel):
    """One training run.

    model / model_options: kind in the model registry and its config dict (``in_channels`` is filled from the
        store). crop_size: (D, H, W) crop voxels; max_context K; n_queries Q; crop_jitter crop voxels. fov /
        fov_margin_mm: the field of view ("adaptive" grows the crop's stride with the tumour; see DataSettings).
    serve_baselines: after training, per horizon bin, serve ``lci`` or ``linear`` where the model did worse on the
        validation targets (``predict.serving``; fitted before the calibration, on as many validation targets as
        ``calib_targets``).
    steps / epochs / budget_s: stop at whichever comes first (at least one must be set); budget_s is wall-clock
        seconds of training, summed over resumes. lr: AdamW peak rate after ``warmup_steps`` linear warm-up;
        "cosine" decays to 10% over ``steps`` (needs steps), "constant" keeps it.
    ema_decay: EMA of weights (used for validation and the saved model). grad_clip: max global grad norm
        (0 disables). read_cache_mb: per-worker read cache of crop neighbourhoods (see StoreReader).
        precision: "auto" = bf16 (fp16 + GradScaler where bf16 is missing) on CUDA, fp32 on CPU.
    eval_every / ckpt_every / log_every: steps. val_targets: at most this many validation targets are
        forecast at each evaluation (evenly spaced over the deterministic target list); best checkpoint =
        highest val whole-tumour Dice.
    calib_targets / calib_samples: after training, a sampled model's volume intervals are calibrated on at most
        this many validation targets with this many samples each (0 targets: no calibration; see
        longitudinal.models.calibration). calib_form: its conformal scores, "scaled" (divided by
        calib_difficulty_ml + |median - linear forecast|, ml; the default, confirmed on an unseen cohort) or
        "symmetric" (gap-normalised only).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "tfm"
    model_options: dict[str, Any] = Field(default_factory=dict)
    crop_size: tuple[int, int, int] = (32, 32, 32)
    max_context: int = Field(3, ge=1)
    n_queries: int = Field(2, ge=1)
    crop_jitter: int = Field(3, ge=0)
    normalize: Literal["none", "context_mean"] = "none"
    fov: Literal["adaptive", "fixed"] = "adaptive"
    fov_margin_mm: float = Field(16.0, ge=0)
    serve_baselines: bool = True
    augment: AugmentSettings | None = Field(default_factory=AugmentSettings)
    samples_per_patient: int = Field(1, ge=1)
    read_cache_mb: float = Field(512.0, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    budget_s: float | None = Field(None, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    num_workers: int = Field(1, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = Field(250, ge=1)
    ckpt_every: int = Field(100, ge=1)
    log_every: int = Field(25, ge=1)
    val_targets: int = Field(24, ge=0)
    val_samples: int = Field(1, ge=1)
    calib_targets: int = Field(240, ge=0)
    calib_samples: int = Field(8, ge=2)
    calib_form: Literal["scaled", "symmetric"] = "scaled"
    calib_difficulty_ml: float = Field(10.0, gt=0)
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        problems = []
        if self.steps is None and self.epochs is None and self.budget_s is None:
            problems.append("set at least one of steps, epochs, budget_s")
        if self.lr_schedule == "cosine" and self.steps is None:
            problems.append("lr_schedule 'cosine' needs steps")
        if any(s < 4 for s in self.crop_size):
            problems.append(f"crop_size must be >= 4 voxels per axis, got {self.crop_size}")
        if self.val_fraction + self.test_fraction >= 1:
            problems.append("val_fraction + test_fraction must be below 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def data_config(self, train: bool = True) -> DataConfig:
        """The DataConfig for training (jitter + augmentation) or evaluation (neither)."""
        aug = AugmentConfig(**self.augment.model_dump()) if (train and self.augment is not None) else None
        return DataConfig(crop_size=tuple(self.crop_size), max_context=self.max_context,  # type: ignore[arg-type]
                          n_queries=self.n_queries if train else 1,
                          crop_jitter=self.crop_jitter if train else 0, normalize=self.normalize, augment=aug,
                          fov=self.fov, fov_margin_mm=self.fov_margin_mm,
                          samples_per_patient=self.samples_per_patient, read_cache_mb=self.read_cache_mb)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def flat_params(self) -> dict[str, Any]:
        """Flat ``a.b`` -> value mapping (for experiment trackers' params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.to_dict())
        return out


# The tuned CPU default (2 cores, 32^3 crops): see benchmarks/forecast_quality.py for the figures.
DEFAULT_TRAIN_CONFIG = TrainConfig(budget_s=1500.0)


def load_train_config(path: Path | None = None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a YAML/JSON file (keys as in TrainConfig; missing keys take the tuned defaults) with
    non-None ``overrides`` on top. Raises ValueError listing every invalid field."""
    data: dict[str, Any] = DEFAULT_TRAIN_CONFIG.to_dict()
    if path is not None:
        text = Path(path).read_text()
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("invalid training config: " + "; ".join(msgs)) from None
