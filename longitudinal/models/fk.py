"""``fk``: a personalised Fisher-Kolmogorov model, fitted per patient at query time (no training).

The field's physical reference. Per forecast:

1. initial density from the FIRST context segmentation: the travelling front of the equation as a function of
   the distance to the visible edge, held at >= u_e in the enhancing core and in [u_w, u_e) in the rest of the
   whole tumour, where u_w / u_e are the densities at the visible edge of the whole tumour and of the enhancing
   core (the imaging thresholds; ``initial_density``);
2. the geometry (``FKGeometry``): the crop's voxel size from ``conditions.spacing_mm`` (else ``spacing_mm`` of the
   config). With tissue maps (``conditions.tissue``: white- and grey-matter probabilities) the growth domain is
   the parenchyma, white + grey >= ``parenchyma_threshold``, inside the head, plus every context tumour, and the
   diffusivity is the synthetic cohort's convention (``longitudinal.synth.anatomy.diffusivity_map``): D in white
   matter, D / ``tissue_ratio`` in grey matter, the tissue-weighted mean in mixed voxels, 0 outside the domain
   (no flux crosses its surface: CSF and the ventricles are barriers). D is the white-matter diffusivity.
   Without tissue maps the domain is the head in the last context image (non-zero voxels) plus every context
   tumour, and D is homogeneous inside it;
3. (D, rho) are fitted to the LATER context segmentations: a coarse grid (``d_grid`` x ``rho_grid``), simulated in
   batches (``fk_solver``), then finer grids around the best so far, in log space, each round at half the step;
   the loss of a parameter set is 1 - the mean whole-tumour and enhancing Dice over the later context scans;
4. samples: parameter sets drawn with likelihood weights exp(-(loss - best loss) / temperature) (uniform over the
   grid when only one context scan is given, so the samples span the plausible growth), each simulated from the
   LAST context segmentation (its initial density built as in step 1) to the query times and thresholded into
   class masks. The image forecast is the last context image (the equation
   describes tumour density, not intensities).

Known treatment events (``conditions.treatments``) act in every simulation, the fit's (events between the context
scans) and the forecast's (events between the last context scan and the query): resection, linear-quadratic
radiotherapy and chemotherapy as in ``fk_treatment`` (whose docstring states the effects and their fixed
parameters). An event on or after a query's day changes nothing of that forecast. rho is the untreated rate.

Units: D in mm^2/day, rho in 1/day, spacings in mm, days since the patient's baseline. Pure torch; CUDA when the
inputs are there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from longitudinal.models.base import Batch, Conditions, Forecast, ForecastModel, check_context, register_model
from longitudinal.models.fk_solver import BatchedFisherKolmogorov
from longitudinal.models.fk_treatment import Event, TreatmentEffects, dilate, simulate

# Parameter sets simulated together on the CPU (measured: about 0.4 ms per set and step at 32^3 in batches of
# one or two, 1.4 ms in batches of four or more).
CPU_BATCH = 2


@dataclass(frozen=True)
class FKConfig:
    """spacing_mm: crop voxel size (mm) when the conditions give none. d_grid / rho_grid: the coarse search
    (mm^2/day, 1/day), log-spaced over the prior ranges of glioma growth (white-matter D about 0.01-1 mm^2/day,
    rho about 0.003-0.2 /day, which hold the synthetic cohort's ranges); the earlier 4 x 4 grid up to 0.3 / 0.06
    could not reach fast tumours and left fits of synthetic patients in local minima. refine: points per axis of
    the local refinement around the best set so far (0 turns it off), repeated refine_rounds times with the step
    halved each round (the first spans half a coarse step). whole_threshold / enhancing_threshold: densities at
    the visible edges. temperature: likelihood weighting of the loss. tissue_ratio: white- over grey-matter
    diffusivity (10, the synthetic cohort's); parenchyma_threshold: white + grey probability from which a voxel
    is parenchyma (0.3, the cohort's). The rest are the treatment effects (``fk_treatment.TreatmentEffects``)."""

    spacing_mm: float = 2.0
    d_grid: tuple[float, ...] = (0.01, 0.025, 0.063, 0.16, 0.4, 1.0)
    rho_grid: tuple[float, ...] = (0.003, 0.007, 0.016, 0.037, 0.086, 0.2)
    refine: int = 3
    refine_rounds: int = 3
    whole_threshold: float = 0.25
    enhancing_threshold: float = 0.7
    temperature: float = 0.02
    tissue_ratio: float = 10.0
    parenchyma_threshold: float = 0.3
    resection_margin_mm: float = TreatmentEffects.resection_margin_mm
    rt_dose_gy: float = TreatmentEffects.rt_dose_gy
    rt_fractions: int = TreatmentEffects.rt_fractions
    rt_alpha: float = TreatmentEffects.rt_alpha
    rt_alpha_beta_gy: float = TreatmentEffects.rt_alpha_beta_gy
    rt_margin_mm: float = TreatmentEffects.rt_margin_mm
    chemo_effect: float = TreatmentEffects.chemo_effect

    @property
    def effects(self) -> TreatmentEffects:
        names = {f.name for f in fields(TreatmentEffects)}
        return TreatmentEffects(**{k: v for k, v in asdict(self).items() if k in names})

    def problems(self) -> list[str]:
        out = []
        if self.spacing_mm <= 0:
            out.append(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if not self.d_grid or min(self.d_grid) <= 0 or not self.rho_grid or min(self.rho_grid) <= 0:
            out.append("d_grid and rho_grid need positive values")
        if not 0 < self.whole_threshold < self.enhancing_threshold < 1:
            out.append(f"need 0 < whole_threshold < enhancing_threshold < 1, got {self.whole_threshold}, "
                       f"{self.enhancing_threshold}")
        if self.temperature <= 0 or self.refine < 0 or self.refine_rounds < 0:
            out.append(f"temperature must be > 0 and refine, refine_rounds >= 0, got {self.temperature}, "
                       f"{self.refine}, {self.refine_rounds}")
        if self.tissue_ratio < 1 or not 0 < self.parenchyma_threshold <= 2:
            out.append(f"need tissue_ratio >= 1 and 0 < parenchyma_threshold <= 2, got {self.tissue_ratio}, "
                       f"{self.parenchyma_threshold}")
        return out + self.effects.problems()


@dataclass(frozen=True)
class FKGeometry:
    """One patient's crop as the equation sees it (module docstring, step 2). domain: [D, H, W] bool, where the
    tumour may grow (no flux leaves it); relative_d: [D, H, W] float32, voxel diffusivity over the white-matter D
    (1 in white matter, 1 / tissue_ratio in grey, 0 outside the domain); spacing_mm: (z, y, x) voxel size (mm)."""

    domain: Tensor
    relative_d: Tensor
    spacing_mm: tuple[float, float, float]

    @classmethod
    def homogeneous(cls, domain: Tensor, spacing_mm: Sequence[float]) -> FKGeometry:
        return cls(domain, domain.float(), tuple(float(s) for s in spacing_mm))  # type: ignore[arg-type]


@dataclass(frozen=True)
class FKFit:
    """The parameter sets considered for one patient and their likelihood weights (sum 1): d [P] mm^2/day
    (white-matter D), rho [P] 1/day, loss [P] (1 - mean Dice on the later context scans; 0 when there were
    none)."""

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

    def config_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}

    def loss(self, batch: Batch) -> Tensor:
        """Zero with no gradient: fitted per patient at query time."""
        return torch.zeros((), device=batch.context_images.device)

    # --- per patient ------------------------------------------------------------------------------------
    def geometry(self, head: Tensor, labels: Tensor, tissue: Tensor | None = None,
                 spacing_mm: Sequence[float] | None = None) -> FKGeometry:
        """The crop's geometry (module docstring, step 2): head [D, H, W] bool (non-zero voxels of the last
        context image), labels [K, D, H, W] the context segmentations, tissue [2, D, H, W] (white, grey) or None,
        spacing_mm (z, y, x) or None (the config's). Tissue maps without any parenchyma in the crop are ignored."""
        spacing = tuple(float(s) for s in spacing_mm) if spacing_mm is not None else (self.config.spacing_mm,) * 3
        tumour = (labels > 0).any(0)
        if tissue is not None:
            white, grey = tissue[0].float().clamp(0, 1), tissue[1].float().clamp(0, 1)
            total = white + grey
            parenchyma = total >= self.config.parenchyma_threshold
            if bool(parenchyma.any()):
                domain = (parenchyma & head) | tumour
                # A tumour voxel where the atlas shows no tissue (it displaced it) diffuses as white matter.
                rel = torch.where(total > 0, (white + grey / self.config.tissue_ratio) / total.clamp_min(1e-6),
                                  torch.ones_like(total))
                return FKGeometry(domain, torch.where(domain, rel, torch.zeros_like(rel)), spacing)  # type: ignore[arg-type]
        return FKGeometry.homogeneous(head | tumour, spacing)

    def initial_density(self, label: Tensor, d: Tensor, rho: Tensor, spacing_mm: Sequence[float] | None = None,
                        relative_d: Tensor | None = None) -> Tensor:
        """[P, D, H, W] float density of one segmentation for each parameter set (module docstring, step 1).

        The Fisher-Kolmogorov front as a function of the signed distance s (mm) to the visible edge (positive
        outside; the edge lies half a voxel beyond the outermost visible voxel centres): c = 1 / (1 + a exp(s /
        (2 lambda)))^2 with lambda = sqrt(D / rho) and a such that c = u_w on the edge. It is the closed form of
        Ablowitz and Zeppetella with its width sqrt(6) lambda narrowed to 2 lambda, so that its tail decays as
        exp(-s / lambda), as the leading edge of the equation's pulled front does. Then clamped so that the
        segmentation is reproduced exactly at its own time: >= u_e in the enhancing core, in [u_w, u_e) in the
        rest of the whole tumour. The shape fixes how much tumour lies inside and beyond the visible edge, which
        sets the growth that follows; on synthetic tumours (4 mm voxels) it matched the true density by distance
        shell within about 25 %, where a profile rising to 1 right behind the edge doubled a small tumour's burden
        and a pure exponential tail from u_w held a third of the mass just outside a high threshold: both biased
        the fitted growth.
        spacing_mm: (z, y, x) voxel size (None: the config's); distances use their geometric mean. relative_d:
        [D, H, W] the geometry's voxel diffusivity over D (None: 1): lambda is local, sqrt(D relative_d / rho), so
        the front is shorter in grey matter, as the equation's own fronts are."""
        u_w, u_e = self.config.whole_threshold, self.config.enhancing_threshold
        whole, enh = label > 0, label == 2
        h = math.prod(spacing_mm) ** (1 / 3) if spacing_mm is not None else self.config.spacing_mm
        d_out = _distance(whole, h)  # mm from the tumour, 0 inside
        d_in = _distance(~whole, h)  # mm from the outside, 0 outside
        s = torch.where(whole, h / 2 - d_in, d_out - h / 2)[None]
        rel = relative_d[None] if relative_d is not None else torch.ones((), device=label.device)
        lam = torch.sqrt((d / rho).view(-1, 1, 1, 1).to(label.device) * rel).clamp_min(1e-3)
        a = 1 / math.sqrt(u_w) - 1
        c = 1 / (1 + a * torch.exp(s / (2 * lam))) ** 2  # exp overflows to inf far outside: c = 0 there
        c = torch.where(enh[None], c.clamp_min(u_e), c)
        return torch.where(whole[None] & ~enh[None], c.clamp(u_w, u_e - 1e-3), c).float()

    def simulate(self, label: Tensor, geometry: FKGeometry, d: Tensor, rho: Tensor, start: float,
                 days: Sequence[float], events: Sequence[Event] = ()) -> Tensor:
        """[T, P, D, H, W] densities at ``days`` (days since baseline, >= ``start``) of every parameter set (d, rho
        [P]) grown from the segmentation ``label`` seen on day ``start`` under the known ``events``."""
        c0 = self.initial_density(label, d, rho, geometry.spacing_mm, geometry.relative_d)
        d, rho = d.float().to(label.device), rho.float().to(label.device)
        # On the CPU small batches run several times faster per set (their arrays stay in cache), and sets of
        # similar rho share the time step its splitting accuracy allows; CUDA takes every set at once.
        order = sorted(range(len(d)), key=lambda k: (float(rho[k]), float(d[k])))
        size = len(order) if label.is_cuda else CPU_BATCH
        out = torch.empty(len(days), len(d), *label.shape, device=label.device)
        for lo in range(0, len(order), size):
            idx = torch.tensor(order[lo:lo + size], device=label.device)
            rho_i = rho[idx]

            def make_solver(diff: Tensor, rho_i: Tensor = rho_i) -> BatchedFisherKolmogorov:
                return BatchedFisherKolmogorov(diff, geometry.domain, geometry.spacing_mm, rho_i)

            out[:, idx] = simulate(make_solver, d[idx].view(-1, 1, 1, 1) * geometry.relative_d[None], c0[idx],
                                   start, days, events, self.config.effects,
                                   (self.config.whole_threshold, self.config.enhancing_threshold),
                                   geometry.spacing_mm)
        return out

    def _masks(self, c: Tensor) -> tuple[Tensor, Tensor]:
        return c >= self.config.whole_threshold, c >= self.config.enhancing_threshold

    def _losses(self, labels: Tensor, days: list[float], geometry: FKGeometry, d: Tensor, rho: Tensor,
                events: Sequence[Event]) -> Tensor:
        snaps = self.simulate(labels[0], geometry, d, rho, days[0], days[1:], events)
        dice = torch.zeros(len(d), device=labels.device)
        for t, lab in enumerate(labels[1:]):
            whole, enh = self._masks(snaps[t])
            dice += _dice(whole, lab > 0) + _dice(enh, lab == 2)
        return 1 - dice / (2 * (len(labels) - 1))

    def fit(self, labels: Tensor, days: Tensor, geometry: FKGeometry | Tensor, events: Sequence[Event] = ()
            ) -> FKFit:
        """Fit (D, rho) to one patient's context: labels [K, D, H, W] (time order), days [K] since baseline,
        geometry (an ``FKGeometry``, or a [D, H, W] bool domain: homogeneous D at the config's spacing), events
        the known treatments (start day, end day, kind). The first scan is the initial state; the later ones are
        fitted."""
        if isinstance(geometry, Tensor):
            geometry = FKGeometry.homogeneous(geometry, (self.config.spacing_mm,) * 3)
        dev = labels.device
        d = torch.tensor(self.config.d_grid, device=dev).repeat_interleave(len(self.config.rho_grid))
        rho = torch.tensor(self.config.rho_grid, device=dev).repeat(len(self.config.d_grid))
        if len(labels) < 2:
            loss = torch.zeros(len(d), device=dev)
            return FKFit(d, rho, loss, torch.full_like(loss, 1.0 / len(d)))
        fit_days = [float(t) for t in days.double()]
        loss = self._losses(labels, fit_days, geometry, d, rho, events)
        step_d = _log_step(self.config.d_grid) / 2
        step_r = _log_step(self.config.rho_grid) / 2
        offs = torch.linspace(-1, 1, self.config.refine, device=dev, dtype=torch.float64)
        od, orr = offs.repeat_interleave(self.config.refine), offs.repeat(self.config.refine)
        new = (od != 0) | (orr != 0)  # the centre is the best set, already simulated
        for _ in range(self.config.refine_rounds if self.config.refine > 0 else 0):
            # Each round re-centres on the best set so far and halves the steps (log space): the loss is sharp in
            # both parameters, and one round around the coarse best left it far from its minimum.
            best = int(torch.argmin(loss))
            rd = (math.log(float(d[best])) + od[new] * step_d).exp().to(d.dtype)
            rr = (math.log(float(rho[best])) + orr[new] * step_r).exp().to(rho.dtype)
            d, rho = torch.cat([d, rd]), torch.cat([rho, rr])
            loss = torch.cat([loss, self._losses(labels, fit_days, geometry, rd, rr, events)])
            step_d, step_r = step_d / 2, step_r / 2
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
        sampled parameter set's density at the query time). ``conditions``: the crop's voxel size, tissue maps
        and known treatments (module docstring); None: the config's spacing, homogeneous D, no treatment."""
        check_context(context_images, context_labels, context_times, context_mask, query_times)
        b, q = query_times.shape
        cond = conditions or Conditions()
        images, probs = [], []
        for i in range(b):
            ks = torch.nonzero(context_mask[i]).flatten()
            ks = ks[torch.argsort(context_times[i, ks])]
            labels, days = context_labels[i, ks], context_times[i, ks].double()
            geometry = self.geometry(
                context_images[i, ks[-1]].abs().sum(0) > 0, labels,
                cond.tissue[i] if cond.tissue is not None else None,
                cond.spacing_mm[i].tolist() if cond.spacing_mm is not None else None)
            events = cond.events(i)
            fitted = self.fit(labels, days, geometry, events)
            pick = torch.multinomial(fitted.weight.cpu(), n_samples, replacement=True, generator=_cpu(generator))
            uniq, inverse = torch.unique(pick, return_inverse=True)
            # Forecasts start from the LAST context scan: the fit says how the tumour grows, the latest scan
            # where it is now.
            last = float(days[-1])
            d_s, rho_s = fitted.d[uniq.to(fitted.d.device)], fitted.rho[uniq.to(fitted.rho.device)]
            snaps = self.simulate(labels[-1], geometry, d_s, rho_s, last,
                                  [max(float(t), last) for t in query_times[i].double()], events)
            whole, enh = self._masks(snaps[:, inverse.to(snaps.device)])  # [Q, S, D, H, W]
            cls = whole.long() + enh.long()
            probs.append(torch.nn.functional.one_hot(cls, 3).permute(0, 1, 5, 2, 3, 4).float())
            image = context_images[i, ks[-1]]
            images.append(image.expand(q, n_samples, *image.shape))
        return Forecast(images=torch.stack(images), probs=torch.stack(probs))


def _distance(mask: Tensor, spacing_mm: float, max_steps: int = 64) -> Tensor:
    """Approximate distance (mm) of every voxel to ``mask`` [D, H, W] (0 inside): the number of dilation steps
    that reach it, alternating 6- and 26-neighbour steps (an octagonal approximation of the Euclidean
    distance), times the voxel size; capped at ``max_steps``."""
    dist = torch.full(mask.shape, float(max_steps), device=mask.device)
    reached = mask.clone()
    dist[reached] = 0.0
    if not bool(reached.any()):
        return dist * spacing_mm
    for k in range(1, max_steps):
        grown = dilate(reached[None], spacing_mm, (spacing_mm,) * 3, first_step=k - 1)[0]
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
