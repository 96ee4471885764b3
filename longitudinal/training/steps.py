"""Pieces of the fit loop that hold no loop state: the weight EMA, the data-parallel context and its process
group, precision, the learning-rate schedule and seeding."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from longitudinal.models.base import ForecastModel
from longitudinal.training.config import TrainConfig


class EMA:
    """Exponential moving average of a model's state (floating tensors averaged, others copied). The effective
    decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the init."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.lerp_(v.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


@dataclass(frozen=True)
class DistContext:
    """torch.distributed settings from the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:

        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                   int(os.environ.get("LOCAL_RANK", "0")))


# How long the other ranks may wait for rank 0's work outside the training steps (final validation, volume
# calibration, evaluation, MLflow logging and registration of a tracked run): hours on a large cohort, far past
# the default collective timeout (10 minutes for NCCL). They wait on a CPU (gloo) barrier, which costs nothing;
# if rank 0 dies instead, torchrun ends them at once.
WAIT_TIMEOUT = timedelta(hours=12)
_wait_group: Any = None


def init_distributed(dist_ctx: DistContext, device: str | torch.device = "auto") -> bool:
    """Join the torchrun process group: NCCL when ``device`` resolves to CUDA (one GPU per LOCAL_RANK), else
    gloo; plus a gloo group with ``WAIT_TIMEOUT`` for ``wait_for_all`` and ``broadcast_from_main``.

    Returns True when this call joined (the caller leaves with ``leave_distributed``); False without
    distribution or when a process group exists already (its owner leaves it). Collective: every rank calls it.
    """
    global _wait_group
    if not dist_ctx.active or torch.distributed.is_initialized():
        return False
    from longitudinal.predict import resolve_device

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        # Bind the rank's GPU before NCCL starts, so its collectives never guess the device.
        torch.cuda.set_device(dist_ctx.local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    _wait_group = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return True


def leave_distributed() -> None:
    """Destroy the process group joined by ``init_distributed`` (and its wait group)."""
    global _wait_group
    _wait_group = None
    torch.distributed.destroy_process_group()


def wait_for_all(dist_ctx: DistContext) -> None:
    """Barrier of every rank with the long ``WAIT_TIMEOUT`` (the default group's when another owner joined)."""
    if dist_ctx.active:
        torch.distributed.barrier(group=_wait_group)


def broadcast_from_main(obj: Any, dist_ctx: DistContext) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank; other ranks pass anything (collective)."""
    if not dist_ctx.active:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


class LossModule(torch.nn.Module):
    """DDP synchronises gradients through ``forward``; models expose ``loss``, so forward calls it."""

    def __init__(self, model: ForecastModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model.loss(batch)


def all_true(flag: bool, dist_ctx: DistContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (collective; plain ``flag`` without distribution)."""
    if not dist_ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def select_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed). CPU always trains in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then constant or cosine to 10% of ``lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine" and cfg.steps:
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return cfg.lr


def seed_everything(seed: int) -> None:

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


