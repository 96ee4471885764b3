"""``fk``: a personalised Fisher-Kolmogorov model, fitted per patient at query time (no training).

The field's physical reference. Per forecast:

1. initial density from the FIRST context segmentation: (1 + u_e) / 2 inside the enhancing core,
   (u_w + u_e) / 2 in the rest of the whole tumour, 0 outside, where u_w / u_e are the densities at the visible
   edge of the whole tumour and of the enhancing core (the imaging thresholds);
2. the domain (no flux leaves it) is the head in the last context image (non-zero voxels) plus every context
   tumour; diffusivity is homogeneous inside it;
3. (D, rho) are fitted to the LATER context segmentations: a coarse grid (``d_grid`` x ``rho_grid``), simulated as
   one batch (``fk_solver``), then a finer grid around the best, in log space; the loss of a parameter set is
   1 - the mean whole-tumour and enhancing Dice over the later context scans;
4. samples: parameter sets drawn with likelihood weights exp(-(loss - best loss) / temperature) (uniform over the
   grid when only one context scan is given, so the samples span the plausible growth), each simulated from the
   LAST context segmentation (its initial density built as in step 1) to the query times and thresholded into
   class masks. The image forecast is the last context image (the equation
   describes tumour density, not intensities).

Units: D in mm^2/day, rho in 1/day, ``spacing_mm`` the crop's voxel size in mm (the Predictor checks it against
the store). Pure torch; CUDA when the inputs are there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from longitudinal.models.base import Batch, Conditions, Forecast, ForecastModel, check_context, register_model
from longitudinal.models.fk_solver import BatchedFisherKolmogorov


@dataclass(frozen=True)
class FKConfig:
    """spacing_mm: crop voxel size (mm). d_grid / rho_grid: the coarse search (mm^2/day, 1/day). refine: points
    per axis of the local refinement around the best coarse set (0 turns it off). whole_threshold /
    enhancing_threshold: densities at the visible edges. temperature: likelihood weighting of the loss."""

    spacing_mm: float = 2.0
    d_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    rho_grid: tuple[float, ...] = (0.004, 0.01, 0.025, 0.06)
    refine: int = 3
    whole_threshold: float = 0.25
    enhancing_threshold: float = 0.7
    temperature: float = 0.02

    def problems(self) -> list[str]:
        out = []
        if self.spacing_mm <= 0:
            out.append(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if not self.d_grid or min(self.d_grid) <= 0 or not self.rho_grid or min(self.rho_grid) <= 0:
            out.append("d_grid and rho_grid need positive values")
        if not 0 < self.whole_threshold < self.enhancing_threshold < 1:
            out.append(f"need 0 < whole_threshold < enhancing_threshold < 1, got {self.whole_threshold}, "
                       f"{self.enhancing_threshold}")
        if self.temperature <= 0 or self.refine < 0:
            out.append(f"temperature must be > 0 and refine >= 0, got {self.temperature}, {self.refine}")
        return out


@dataclass(frozen=True)
class FKFit:
    """The parameter sets considered for one patient and their likelihood weights (sum 1): d [P] mm^2/day,
    rho [P] 1/day, loss [P] (1 - mean Dice on the later context scans; 0 when there were none)."""

    d: Tensor
    rho: Tensor
    loss: Tensor
    weight: Tensor

    def best(self) -> tuple[float, float]:
        i = int(torch.argmin(self.loss))
        return float(self.d[i]), float(self.rho[i])


def _dice(pred: Tensor, truth: Tensor) -> Tensor:
    """Dice of masks pred [P, ...] against truth [...] (1 when both are empty)."""
    inter = (pred & truth).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + truth.sum().float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


@register_model("fk")
class FisherKolmogorovModel(ForecastModel):
    """Personalised Fisher-Kolmogorov growth (module docstring)."""

    kind = "fk"
    stochastic = True
    trainable = False

    def __init__(self, **config: Any) -> None:
        super().__init__()
        config.pop("in_channels", None)  # every kind accepts it; the equation needs no image channels
        for key in ("d_grid", "rho_grid"):
            if key in config:
                config[key] = tuple(float(v) for v in config[key])
        self.config = FKConfig(**config)
        problems = self.config.problems()
        if problems:
            raise ValueError("bad fk config: " + "; ".join(problems))

    @property
    def grid_spacing_mm(self) -> tuple[float, float, float]:
        """The voxel size the diffusivities assume; the Predictor refuses a store on another grid."""
        return (self.config.spacing_mm,) * 3

    def config_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}

    def loss(self, batch: Batch) -> Tensor:
        """Zero with no gradient: fitted per patient at query time."""
        return torch.zeros((), device=batch.context_images.device)

    # --- per patient ------------------------------------------------------------------------------------
    def initial_density(self, label: Tensor, d: Tensor, rho: Tensor) -> Tensor:
        """[P, D, H, W] float density of one segmentation for each parameter set (module docstring, step 1): the
        travelling-wave profile of length lambda = sqrt(D / rho), u_w at the visible edge, decaying as
        exp(-distance / lambda) outside and rising towards 1 inside, then held above u_e in the enhancing core and
        below it elsewhere, so the segmentation is reproduced exactly at its own time."""
        u_w, u_e = self.config.whole_threshold, self.config.enhancing_threshold
        whole, enh = label > 0, label == 2
        h = self.config.spacing_mm
        d_out = _distance(whole, h)[None]  # mm from the tumour, 0 inside
        d_in = _distance(~whole, h)[None]  # mm from the outside, 0 outside
        lam = torch.sqrt(d / rho).view(-1, 1, 1, 1).to(label.device)
        c = torch.where(whole[None], u_w + (1 - u_w) * (1 - torch.exp(-d_in / lam)), u_w * torch.exp(-d_out / lam))
        c = torch.where(enh[None], c.clamp_min((1 + u_e) / 2), c)
        return torch.where(whole[None] & ~enh[None], c.clamp(u_w, u_e - 1e-3), c).float()

    def _simulate(self, c0: Tensor, domain: Tensor, d: Tensor, rho: Tensor, days: list[float]) -> Tensor:
        solver = BatchedFisherKolmogorov(d.view(-1, 1, 1, 1).expand(len(d), *domain.shape), domain,
                                         self.config.spacing_mm, rho)
        return solver.snapshots(c0, days)  # [T, P, D, H, W]

    def _masks(self, c: Tensor) -> tuple[Tensor, Tensor]:
        return c >= self.config.whole_threshold, c >= self.config.enhancing_threshold

    def _losses(self, first: Tensor, domain: Tensor, d: Tensor, rho: Tensor, labels: Tensor, days: list[float]
                ) -> Tensor:
        snaps = self._simulate(self.initial_density(first, d, rho), domain, d, rho, days)
        dice = torch.zeros(len(d), device=first.device)
        for t, lab in enumerate(labels):
            whole, enh = self._masks(snaps[t])
            dice += _dice(whole, lab > 0) + _dice(enh, lab == 2)
        return 1 - dice / (2 * len(labels))

    def fit(self, labels: Tensor, days: Tensor, domain: Tensor) -> FKFit:
        """Fit (D, rho) to one patient's context: labels [K, D, H, W] (time order), days [K] since baseline,
        domain [D, H, W] bool. The first scan is the initial state; the later ones are fitted."""
        dev = labels.device
        d = torch.tensor(self.config.d_grid, device=dev).repeat_interleave(len(self.config.rho_grid))
        rho = torch.tensor(self.config.rho_grid, device=dev).repeat(len(self.config.d_grid))
        if len(labels) < 2:
            loss = torch.zeros(len(d), device=dev)
            return FKFit(d, rho, loss, torch.full_like(loss, 1.0 / len(d)))
        fit_days = [float(t - days[0]) for t in days[1:]]
        loss = self._losses(labels[0], domain, d, rho, labels[1:], fit_days)
        if self.config.refine > 0:
            best_d, best_rho = float(d[torch.argmin(loss)]), float(rho[torch.argmin(loss)])
            step_d = _log_step(self.config.d_grid) / 2
            step_r = _log_step(self.config.rho_grid) / 2
            offs = torch.linspace(-1, 1, self.config.refine, device=dev)
            rd = (math.log(best_d) + offs * step_d).exp().repeat_interleave(self.config.refine)
            rr = (math.log(best_rho) + offs * step_r).exp().repeat(self.config.refine)
            d, rho = torch.cat([d, rd]), torch.cat([rho, rr])
            loss = torch.cat([loss, self._losses(labels[0], domain, rd, rr, labels[1:], fit_days)])
        w = torch.exp(-(loss - loss.min()) / self.config.temperature)
        return FKFit(d, rho, loss, w / w.sum())

    # --- the model interface ---------------------------------------------------------------------------
    @torch.no_grad()
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
        """images [B,Q,S,C,D,H,W] (the last context image), probs [B,Q,S,3,D,H,W] (one-hot class masks of each
        sampled parameter set's density at the query time)."""
        check_context(context_images, context_labels, context_times, context_mask, query_times)
        b, q = query_times.shape
        images, probs = [], []
        for i in range(b):
            ks = torch.nonzero(context_mask[i]).flatten()
            ks = ks[torch.argsort(context_times[i, ks])]
            labels, days = context_labels[i, ks], context_times[i, ks].double()
            domain = (context_images[i, ks[-1]].abs().sum(0) > 0) | (labels > 0).any(0)
            fitted = self.fit(labels, days, domain)
            pick = torch.multinomial(fitted.weight.cpu(), n_samples, replacement=True, generator=_cpu(generator))
            uniq, inverse = torch.unique(pick, return_inverse=True)
            # Forecasts start from the LAST context scan: the fit says how the tumour grows, the latest scan
            # where it is now.
            rel = [float(t - days[-1]) for t in query_times[i].double()]
            d_s, rho_s = fitted.d[uniq.to(fitted.d.device)], fitted.rho[uniq.to(fitted.rho.device)]
            snaps = self._simulate(self.initial_density(labels[-1], d_s, rho_s), domain, d_s, rho_s,
                                   [max(r, 0.0) for r in rel])
            whole, enh = self._masks(snaps[:, inverse.to(snaps.device)])  # [Q, S, D, H, W]
            cls = whole.long() + enh.long()
            probs.append(torch.nn.functional.one_hot(cls, 3).permute(0, 1, 5, 2, 3, 4).float())
            last = context_images[i, ks[-1]]
            images.append(last.expand(q, n_samples, *last.shape))
        return Forecast(images=torch.stack(images), probs=torch.stack(probs))


def _distance(mask: Tensor, spacing_mm: float, max_steps: int = 64) -> Tensor:
    """Approximate distance (mm) of every voxel to ``mask`` [D, H, W] (0 inside): the number of 3x3x3 dilations
    that reach it (a chessboard distance, enough for an exponential profile), capped at ``max_steps``."""
    dist = torch.full(mask.shape, float(max_steps), device=mask.device)
    reached = mask.clone()
    dist[reached] = 0.0
    if not bool(reached.any()):
        return dist * spacing_mm
    for k in range(1, max_steps):
        grown = torch.nn.functional.max_pool3d(reached[None, None].float(), 3, 1, 1)[0, 0] > 0
        new = grown & ~reached
        if not bool(new.any()):
            break
        dist[new] = float(k)
        reached = grown
    return dist * spacing_mm


def _log_step(grid: tuple[float, ...]) -> float:
    """Mean spacing of a sorted grid in log space (the refinement spans half of it on each side)."""
    vals = sorted(grid)
    return (math.log(vals[-1]) - math.log(vals[0])) / max(len(vals) - 1, 1)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    # multinomial draws on the CPU weights; a CUDA generator cannot drive it, so a CPU one takes its seed.
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())
