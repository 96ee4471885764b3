"""The one interface every forecasting model implements (baselines included), plus the model registry.

Shapes (B batch, K context scans, Q query times, S samples, C channels, D/H/W crop voxels):

    context_images  [B, K, C, D, H, W] float32, intensity-normalised
    context_labels  [B, K, D, H, W]    int64 in {0, 1, 2}
    context_times   [B, K]             float32 days since the patient's baseline
    context_mask    [B, K]             bool, True where a context scan is present (padding is False)
    query_times     [B, Q]             float32 days since the patient's baseline (after the last context)

Models never see raw days: ``scale_days`` is the single place where days become model time (years).

Beside the scans a model may read ``Conditions`` (treatment events, the crop's voxel size, tissue maps); every
model accepts them and a model that does not use them ignores them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

N_CLASSES = 3  # 0 background, 1 oedema/non-enhancing, 2 enhancing
DAYS_PER_YEAR = 365.25
# Treatment kinds in the order of their code in ``Conditions.treatments`` (the store's kinds, same spelling).
TREATMENT_KINDS = ("surgery", "radiotherapy", "chemotherapy")
NO_EVENT = -1.0  # kind code of a padding row


def scale_days(days: Tensor) -> Tensor:
    """Days -> model time in years. The only place the time scale is defined."""
    return days / DAYS_PER_YEAR


@dataclass
class Conditions:
    """What a model may know beside the scans, per batch item (B as in the module docstring).

    treatments: [B, E, 3] float32 rows (start day, end day, kind code), days since the patient's baseline like
        ``context_times``; the kind code indexes ``TREATMENT_KINDS``; an event without an end (a surgery) has
        end = start; padding rows have kind ``NO_EVENT``. The recorded history plus, for a counterfactual query,
        the planned events. None: no treatment information (a model treats the patient as untreated).
    spacing_mm: [B, 3] float32 (z, y, x) size of one crop voxel in mm (the store spacing times the crop's stride,
        which adapts to the tumour's size). None: the model's own default.
    tissue: [B, 2, D, H, W] float32 white- and grey-matter probabilities on the crop, or None when unknown.
    """

    treatments: Tensor | None = None
    spacing_mm: Tensor | None = None
    tissue: Tensor | None = None

    def to(self, device: torch.device | str) -> Conditions:
        return Conditions(*(v.to(device) if isinstance(v, Tensor) else v
                            for v in (self.treatments, self.spacing_mm, self.tissue)))

    def item(self, i: int) -> Conditions:
        """The conditions of batch item ``i``, keeping the batch axis (size 1)."""
        return Conditions(*(v[i:i + 1] if isinstance(v, Tensor) else v
                            for v in (self.treatments, self.spacing_mm, self.tissue)))

    def events(self, i: int) -> list[tuple[float, float, str]]:
        """Batch item ``i``'s events as (start day, end day, kind), in start order (empty when none)."""
        if self.treatments is None:
            return []
        rows = [(float(r[0]), float(r[1]), TREATMENT_KINDS[int(r[2])]) for r in self.treatments[i].tolist()
                if int(r[2]) >= 0]
        return sorted(rows)


def encode_treatments(events: list[list[tuple[float, float, str]]], min_rows: int = 1) -> Tensor:
    """Per batch item lists of (start day, end day, kind) -> ``Conditions.treatments`` [B, E, 3], padded with
    ``NO_EVENT`` rows (E >= ``min_rows``). Raises ValueError naming an unknown kind."""
    width = max([min_rows, *(len(e) for e in events)])
    out = torch.zeros(len(events), width, 3)
    out[..., 2] = NO_EVENT
    for b, evs in enumerate(events):
        for j, (start, end, kind) in enumerate(sorted(evs)):
            if kind not in TREATMENT_KINDS:
                raise ValueError(f"unknown treatment kind {kind!r}; valid kinds: {list(TREATMENT_KINDS)}")
            out[b, j] = torch.tensor([float(start), float(end), float(TREATMENT_KINDS.index(kind))])
    return out


@dataclass
class Batch:
    """A training/evaluation batch. Shapes in the module docstring; targets: [B,Q,C,D,H,W] and [B,Q,D,H,W].

    query_mask [B, Q] bool marks real queries. voxel_volume_ml [B] converts voxel counts to ml.
    """

    context_images: Tensor
    context_labels: Tensor
    context_times: Tensor
    context_mask: Tensor
    query_times: Tensor
    query_mask: Tensor
    target_images: Tensor | None = None
    target_labels: Tensor | None = None
    voxel_volume_ml: Tensor | None = None
    conditions: Conditions | None = None

    def to(self, device: torch.device | str) -> Batch:
        kw = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor | Conditions) else v)
              for f in fields(self)}
        return Batch(**kw)

    def check(self) -> None:
        """Raise ValueError naming every shape problem at once."""
        check_context(self.context_images, self.context_labels, self.context_times, self.context_mask,
                      self.query_times)
        problems = []
        b, q = self.query_times.shape
        if self.query_mask.shape != (b, q):
            problems.append(f"query_mask {tuple(self.query_mask.shape)} != {(b, q)}")
        spatial = tuple(self.context_images.shape[-3:])
        c = self.context_images.shape[2]
        if self.target_images is not None and tuple(self.target_images.shape) != (b, q, c, *spatial):
            problems.append(f"target_images {tuple(self.target_images.shape)} != {(b, q, c, *spatial)}")
        if self.target_labels is not None and tuple(self.target_labels.shape) != (b, q, *spatial):
            problems.append(f"target_labels {tuple(self.target_labels.shape)} != {(b, q, *spatial)}")
        if problems:
            raise ValueError("bad batch: " + "; ".join(problems))


def check_context(images: Tensor, labels: Tensor, times: Tensor, mask: Tensor, query_times: Tensor) -> None:
    """Validate context/query shapes; one ValueError listing every problem."""
    problems = []
    if images.ndim != 6:
        problems.append(f"context_images must be [B,K,C,D,H,W], got {tuple(images.shape)}")
    else:
        b, k = images.shape[:2]
        if tuple(labels.shape) != (b, k, *images.shape[-3:]):
            problems.append(f"context_labels {tuple(labels.shape)} != {(b, k, *images.shape[-3:])}")
        if tuple(times.shape) != (b, k):
            problems.append(f"context_times {tuple(times.shape)} != {(b, k)}")
        if tuple(mask.shape) != (b, k):
            problems.append(f"context_mask {tuple(mask.shape)} != {(b, k)}")
        elif not bool(mask.any(dim=1).all()):
            problems.append("every sample needs at least one context scan (a row of context_mask is all False)")
        if query_times.ndim != 2 or query_times.shape[0] != b:
            problems.append(f"query_times must be [B,Q] with B={b}, got {tuple(query_times.shape)}")
    if problems:
        raise ValueError("bad model input: " + "; ".join(problems))


@dataclass
class Forecast:
    """Model output.

    images: [B, Q, S, C, D, H, W] image samples (same normalisation as the inputs).
    probs:  [B, Q, S, 3, D, H, W] tumour class probabilities per sample (sum to 1 over dim 3).
    """

    images: Tensor
    probs: Tensor

    @property
    def whole_prob(self) -> Tensor:
        """[B, Q, S, D, H, W] probability of any tumour (class 1 or 2)."""
        return self.probs[:, :, :, 1] + self.probs[:, :, :, 2]

    @property
    def enhancing_prob(self) -> Tensor:
        """[B, Q, S, D, H, W] probability of enhancing tumour (class 2)."""
        return self.probs[:, :, :, 2]

    def masks(self) -> tuple[Tensor, Tensor]:
        """Hard per-sample masks ([B,Q,S,D,H,W] bool): whole tumour, enhancing core (argmax labels)."""
        lab = self.probs.argmax(dim=3)
        return lab > 0, lab == 2

    def volumes_ml(self, voxel_volume_ml: Tensor | float) -> Tensor:
        """[B, Q, S, 2] volumes in ml of (whole tumour, enhancing core) per sample, from the hard masks."""
        whole, enh = self.masks()
        v = torch.stack([whole.flatten(3).sum(-1), enh.flatten(3).sum(-1)], dim=-1).float()
        vox = torch.as_tensor(voxel_volume_ml, dtype=v.dtype, device=v.device)
        return v * (vox.view(-1, 1, 1, 1) if vox.ndim == 1 else vox)

    @property
    def n_samples(self) -> int:
        return int(self.images.shape[2])


class ForecastModel(nn.Module, ABC):
    """Base class for every model kind. Subclasses set ``kind`` and ``stochastic``."""

    kind: ClassVar[str]
    stochastic: ClassVar[bool] = False  # True when samples differ (intervals are meaningful)
    trainable: ClassVar[bool] = True  # False for closed-form baselines
    # {structure: VolumeCalibration} fitted on validation patients (longitudinal.models.calibration); set by
    # the checkpoint loader. None/empty: intervals come from the raw samples.
    volume_calibration: Mapping[str, Any] | None = None

    @abstractmethod
    def loss(self, batch: Batch) -> Tensor:
        """Scalar training loss for a batch (baselines may return a zero that carries no gradient)."""

    @abstractmethod
    def sample(
        self,
        context_images: Tensor,
        context_labels: Tensor,
        context_times: Tensor,
        context_mask: Tensor,
        query_times: Tensor,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        conditions: Conditions | None = None,
    ) -> Forecast:
        """Forecast at ``query_times`` from the context. Shapes in the module docstring; ``conditions`` (optional)
        as in ``Conditions``."""

    def config_dict(self) -> dict[str, Any]:
        """JSON-able config that rebuilds this model with ``build_model(kind, config)``."""
        return {}

    @classmethod
    def upgrade_checkpoint(cls, config: dict[str, Any], state_dict: dict[str, Tensor]
                           ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """A checkpoint's config and weights as this version builds and loads them. Kinds whose layout
        changed map checkpoints of earlier versions here, so registered models keep loading."""
        return config, state_dict


ModelFactory = Callable[..., ForecastModel]
MODEL_KINDS: dict[str, ModelFactory] = {}


def register_model(kind: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a model class/factory to the registry under ``kind``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if kind in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} registered twice")
        MODEL_KINDS[kind] = factory
        return factory

    return deco


def build_model(kind: str, config: dict[str, Any] | None = None, **common: Any) -> ForecastModel:
    """Build a model of ``kind`` from its config dict; the error lists valid kinds.

    ``common`` holds build arguments every kind accepts, overriding the config: ``in_channels`` (image
    channels C; the closed-form baselines ignore it).
    """
    import longitudinal.models  # noqa: F401  (populates MODEL_KINDS)

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](**{**(config or {}), **common})


def closed_form_kinds() -> list[str]:
    """Model kinds that need no trained weights (``lci``, ``linear``, ``fk``): usable by name wherever a model
    reference is asked for."""
    import longitudinal.models  # noqa: F401  (populates MODEL_KINDS)

    return sorted(k for k, f in MODEL_KINDS.items() if isinstance(f, type) and not f.trainable)
