"""The one Predictor: a patient's series and query times -> forecast samples, volumes and calibrated intervals.

Evaluation scoring, calibration fitting, ``forecast_patient`` (CLI, flow, demo), the MLflow pyfunc and the run
figures all call :meth:`Predictor.predict`, so a registry consumer, a user of the CLI and the evaluation table see
the same numbers for the same scans, query and seed.

Per query (days since baseline) the context is the up-to-K most recent scans strictly before it, the crop is
centred on the context tumours and intensities are scaled as in training (``longitudinal.data.context``).
Queries that share a context are sampled in one model call. The sampling seed of a call is derived from the
caller's ``seed`` and the context's days, so two paths that see the same scans draw the same noise, while
different patients and cuts draw different noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from longitudinal.data.context import (
    CropBox,
    PatientSeries,
    context_crop,
    context_indices,
    normalisation_scale,
    read_box,
    treatment_in_gap,
)
from longitudinal.models.base import Conditions, ForecastModel, build_model, encode_treatments
from longitudinal.models.baselines import linear_volumes_ml
from longitudinal.models.calibration import VolumeCalibration, select_calibration, selected_key
from longitudinal.models.checkpoint import Checkpoint, DataSettings
from longitudinal.predict.fov import FieldOfView, border_share, field_of_view
from longitudinal.predict.result import VolumeInterval
from longitudinal.predict.serving import ServingPolicy
from longitudinal.runtime import tune_cpu_allocator


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class QueryPrediction:
    """The forecast of one query time.

    days: days since baseline; gap_days: days after the last context scan; context: indices of the context scans
    (time order); crop: the crop of the store grid the model saw. volumes_ml: (S, 2) float64 per-sample (whole,
    enhancing) volumes in ml from the hard masks; linear_ml: (2,) the ``linear`` baseline's volume forecast from
    the same context (what a difficulty-scaled calibration needs); whole / enhancing: median and 80% / 95%
    intervals (calibrated when the model carries a calibration, capped at the crop volume). mean_image
    (C, D, H, W) float32 in store intensities (the scale undone), prob_whole / prob_enhancing (D, H, W) float32:
    the sample means on the crop. scale: (C,) the normalisation divisor. images / probs: the raw samples
    [S, C, D, H, W] (normalised intensities) and [S, 3, D, H, W], kept only when asked for (evaluation).
    field_of_view: whether the tumour and its forecast fit the crop; when not, the forecast cannot be trusted.
    """

    days: float
    gap_days: float
    context: tuple[int, ...]
    crop: CropBox
    volumes_ml: np.ndarray
    linear_ml: np.ndarray
    whole: VolumeInterval
    enhancing: VolumeInterval
    mean_image: np.ndarray
    prob_whole: np.ndarray
    prob_enhancing: np.ndarray
    scale: np.ndarray
    max_ml: float
    images: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    field_of_view: FieldOfView | None = None  # whether the forecast fits the crop (``predict.fov``)
    # "model", or the baseline a serving policy chose for this horizon and treatment stratum (``serving``).
    served_by: str = "model"
    # The calibration the whole-tumour interval used: "whole" (pooled), "whole:treated" / "whole:untreated"
    # (the query's treatment stratum), or None (raw sample quantiles).
    calibration: str | None = None

    @property
    def n_context(self) -> int:
        return len(self.context)

    @property
    def last_context(self) -> int:
        return self.context[-1]


@dataclass
class Prediction:
    """Every query of one ``predict`` call, in the order given; ``n_samples`` samples each."""

    patient_id: str
    queries: list[QueryPrediction] = field(default_factory=list)
    n_samples: int = 1


class Predictor:
    """A model with the input settings it was trained with (crop size, context size, normalisation, channels).

    model: any ``ForecastModel`` (moved to ``device`` and put in eval mode); crop_size: (D, H, W) voxels;
    data: context size and normalisation; channels: the store channels in the model's input order (None: all of
    the series' channels in store order); spacing_mm: the grid the model was trained on (None: not checked).
    device: "auto" picks CUDA when present, where sampling runs under bfloat16 autocast. serving: which horizons
    (per treatment stratum of the query's gap) a simple baseline serves instead of the model
    (``predict.serving``; None: the model everywhere).
    """

    def __init__(self, model: ForecastModel, crop_size: Sequence[int], data: DataSettings | None = None,
                 channels: Sequence[str] | None = None, spacing_mm: Sequence[float] | None = None,
                 device: str | torch.device | None = "auto", serving: ServingPolicy | None = None) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.model = model.to(self.device).eval()
        self.crop_size = tuple(int(s) for s in crop_size)
        self.data = data or DataSettings()
        self.channels = tuple(channels) if channels is not None else None
        # A model whose parameters are physical (fk's mm^2/day) declares the voxel size it assumes.
        spacing_mm = spacing_mm if spacing_mm is not None else getattr(model, "grid_spacing_mm", None)
        self.spacing_mm = tuple(float(s) for s in spacing_mm) if spacing_mm is not None else None
        self.serving = serving
        self._served: dict[str, Predictor] = {}

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: str | torch.device | None = "auto") -> Predictor:
        return cls(ckpt.build(), ckpt.crop_size, ckpt.data, ckpt.channels, ckpt.spacing_mm, device,
                   ServingPolicy.from_meta(ckpt.provenance.get("serving")))

    def like(self, model: ForecastModel) -> Predictor:
        """Another model (a baseline) applied with this predictor's settings, on the same device."""
        return Predictor(model, self.crop_size, self.data, self.channels, self.spacing_mm, self.device)

    @classmethod
    def baseline(cls, kind: str, crop_size: Sequence[int], data: DataSettings | None = None,
                 device: str | torch.device | None = "auto") -> Predictor:
        return cls(build_model(kind), crop_size, data, None, None, device)

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def stochastic(self) -> bool:
        return bool(self.model.stochastic)

    @property
    def calibration(self) -> Mapping[str, VolumeCalibration]:
        return dict(self.model.volume_calibration or {})

    def channel_problems(self, channels: Sequence[str], spacing_mm: Sequence[float] | None = None) -> list[str]:
        """Why this model cannot read data with ``channels`` on a grid of ``spacing_mm`` (empty when it can)."""
        problems = []
        if self.channels is not None:
            missing = [c for c in self.channels if c not in channels]
            if missing:
                problems.append(f"channel mismatch: the model needs channels {list(self.channels)}, the data has "
                                f"{list(channels)} (missing {missing})")
        if (spacing_mm is not None and self.spacing_mm is not None
                and not np.allclose(np.asarray(spacing_mm, float), np.asarray(self.spacing_mm), atol=1e-3)):
            problems.append(f"spacing mismatch: the model was trained at {list(self.spacing_mm)} mm, the store "
                            f"grid is {list(spacing_mm)} mm")
        return problems

    # --- the one prediction ---------------------------------------------------------------------------------
    def predict(self, series: PatientSeries, days_since_baseline: Sequence[float], n_samples: int = 32,
                seed: int = 0, keep_samples: bool = False) -> Prediction:
        """Forecast ``series`` at ``days_since_baseline`` (each after the first scan; query forms other than days
        since baseline are resolved before, see ``queries.Queries``).

        n_samples: samples per query for a sampled model (a deterministic model always gives 1). seed: the
        caller's sampling seed (module docstring). keep_samples: keep each query's raw samples (evaluation).
        Raises ValueError listing every problem (no scan before a query, channels the series lacks).
        """
        days = series.days
        problems = self.channel_problems(tuple(series.arrays.channels), series.spacing_mm)
        groups: dict[tuple[int, ...], list[int]] = {}
        for qi, q in enumerate(days_since_baseline):
            ctx = context_indices(days, float(q), self.data.max_context)
            if not ctx:
                problems.append(f"query day {float(q):g} is not after the first scan (day {days[0]:g})")
            groups.setdefault(ctx, []).append(qi)
        if int(n_samples) < 1:
            problems.append(f"n_samples must be >= 1, got {n_samples}")
        if problems:
            raise ValueError(f"cannot forecast {series.patient_id}: " + "; ".join(problems))
        s = int(n_samples) if self.stochastic else 1
        out: list[QueryPrediction | None] = [None] * len(days_since_baseline)
        by_baseline = self._serve_baselines(series, groups, days_since_baseline, n_samples, seed, keep_samples)
        for qi, p in by_baseline.items():
            out[qi] = p
        for ctx, qis in groups.items():
            qis = [qi for qi in qis if qi not in by_baseline]
            if not qis:
                continue
            preds = self._predict_context(series, ctx, [float(days_since_baseline[i]) for i in qis], s, seed, keep_samples)
            for qi, p in zip(qis, preds, strict=True):
                out[qi] = p
        return Prediction(series.patient_id, [p for p in out if p is not None], s)

    def _serve_baselines(self, series: PatientSeries, groups: Mapping[tuple[int, ...], list[int]],
                         qdays: Sequence[float], n_samples: int, seed: int, keep_samples: bool
                         ) -> dict[int, QueryPrediction]:
        """The queries the serving policy gives to a baseline, forecast by it (query index -> prediction)."""
        if self.serving is None or not self.serving.uses_baselines:
            return {}
        days = series.days
        wanted: dict[str, list[int]] = {}
        for ctx, qis in groups.items():
            for qi in qis:
                last = float(days[ctx[-1]])
                src = self.serving.source_for(float(qdays[qi]) - last,
                                              treatment_in_gap(series.events, last, float(qdays[qi])))
                if src != "model":
                    wanted.setdefault(src, []).append(qi)
        out: dict[int, QueryPrediction] = {}
        for kind, qis in wanted.items():
            if kind not in self._served:
                model = build_model(kind)
                # The calibration was fitted on the served forecasts, baselines included.
                model.volume_calibration = self.model.volume_calibration
                self._served[kind] = Predictor(model, self.crop_size, self.data, self.channels, self.spacing_mm,
                                               self.device)
            pred = self._served[kind].predict(series, [float(qdays[i]) for i in qis], n_samples, seed, keep_samples)
            for qi, p in zip(qis, pred.queries, strict=True):
                p.served_by = kind
                out[qi] = p
        return out

    def _predict_context(self, series: PatientSeries, ctx: tuple[int, ...], qdays: list[float], n_samples: int,
                         seed: int, keep_samples: bool) -> list[QueryPrediction]:
        arr, idx = series.arrays, list(ctx)
        store_channels = list(arr.channels)
        ch = [store_channels.index(c) for c in self.channels] if self.channels is not None \
            else list(range(len(store_channels)))
        box = context_crop(series, idx, self.crop_size, self.data)
        images = torch.from_numpy(read_box(arr.image, (idx, slice(None)), box).astype(np.float32)[:, ch])
        labels = torch.from_numpy(read_box(arr.label, (idx,), box, labels=True).astype(np.int64))
        scale = normalisation_scale(images, self.data.normalize)
        images = images / scale.view(1, -1, 1, 1, 1)
        dev = self.device
        context_days = series.days[idx]
        times = torch.tensor(context_days, dtype=torch.float32)[None]
        mask = torch.ones(1, len(idx), dtype=torch.bool)
        qt = torch.tensor(qdays, dtype=torch.float32)[None]
        gen = torch.Generator(device=dev).manual_seed(_call_seed(seed, context_days))
        voxel_ml = box.voxel_ml(series.spacing_mm)
        cond = Conditions(treatments=encode_treatments([series.events]),
                          spacing_mm=torch.tensor([box.spacing_mm(series.spacing_mm)], dtype=torch.float32),
                          tissue=self._tissue(series, box))
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            fc = self.model.sample(images[None].to(dev), labels[None].to(dev), times.to(dev), mask.to(dev),
                                   qt.to(dev), n_samples=n_samples, generator=gen, conditions=cond.to(dev))
        probs = fc.probs[0].float()  # [Q, S, 3, D, H, W]
        vols = sample_volumes_ml(probs, voxel_ml)  # (Q, S, 2)
        lin = linear_volumes_ml(labels[None], times, mask, qt, voxel_ml)[0].numpy()  # (Q, 2)
        mean_img = (fc.images[0].float().mean(1).cpu() * scale.view(1, -1, 1, 1, 1)).numpy()
        p_whole = (probs[:, :, 1] + probs[:, :, 2]).mean(1).cpu().numpy()
        p_enh = probs[:, :, 2].mean(1).cpu().numpy()
        max_ml = box.volume_ml(series.spacing_mm)
        at_border = border_share(probs)
        context_boxes = [series.box(t) for t in idx]
        cals = self.calibration
        last_day = float(series.days[idx[-1]])
        out = []
        for j, q in enumerate(qdays):
            gap = q - last_day
            treated = treatment_in_gap(series.events, last_day, q)
            whole_key = selected_key(cals, "whole", treated)
            whole = VolumeInterval.from_samples(vols[j, :, 0], gap, None if whole_key is None else cals[whole_key],
                                                float(lin[j, 0]), max_ml)
            out.append(QueryPrediction(
                days=q, gap_days=gap, context=ctx, crop=box, volumes_ml=vols[j], linear_ml=lin[j],
                whole=whole,
                enhancing=VolumeInterval.from_samples(vols[j, :, 1], gap,
                                                      select_calibration(cals, "enhancing", treated),
                                                      float(lin[j, 1]), max_ml),
                mean_image=mean_img[j], prob_whole=p_whole[j], prob_enhancing=p_enh[j], scale=scale.numpy(),
                max_ml=max_ml,
                images=fc.images[0, j].float().cpu() if keep_samples else None,
                probs=probs[j].cpu() if keep_samples else None,
                field_of_view=field_of_view(box, series.spacing_mm, context_boxes,
                                            float(at_border[j]), n_samples, whole.hi95, max_ml),
                calibration=whole_key,
            ))
        return out

    @staticmethod
    def _tissue(series: PatientSeries, box: CropBox) -> torch.Tensor | None:
        """[1, 2, D, H, W] white/grey-matter probabilities on the crop, or None when the store holds none."""
        tissue = getattr(series.arrays, "tissue", None)
        if tissue is None:
            return None
        crop = read_box(tissue, (slice(None),), box).astype(np.float32)
        if np.issubdtype(np.asarray(tissue[:0]).dtype, np.integer):
            crop = crop / 255.0  # stored as uint8 0..255
        return torch.from_numpy(crop)[None]


def _call_seed(seed: int, context_days: np.ndarray) -> int:
    """A 63-bit generator seed from the caller's seed and the context's days (rounded to 1e-6 d)."""
    text = f"{int(seed)}|" + ",".join(f"{float(d):.6f}" for d in context_days)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def sample_volumes_ml(probs: torch.Tensor, voxel_ml: float) -> np.ndarray:
    """(whole, enhancing) volume in ml of every sample's hard mask: probs [Q, S, 3, D, H, W] -> (Q, S, 2) float64.

    Same masks as ``Forecast.masks`` (argmax over the classes, ties to the lower class), from two comparisons
    instead of an argmax over a non-contiguous axis, which is several times slower on CPU at S = 32.
    """
    p0, p1, p2 = probs[:, :, 0], probs[:, :, 1], probs[:, :, 2]
    whole = (p1.maximum(p2) > p0).flatten(2).sum(-1)
    enh = ((p2 > p0) & (p2 > p1)).flatten(2).sum(-1)
    counts = np.stack([whole.cpu().numpy(), enh.cpu().numpy()], axis=-1).astype(np.float64)
    return counts * float(voxel_ml)
