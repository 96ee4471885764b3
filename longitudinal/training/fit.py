"""The fit loop: split by patient, stream samples from the store, AdamW with warm-up, gradient clipping, an EMA
of the weights, autocast on CUDA, checkpoints (latest + best) with exact resume, and metrics to a MetricLogger.

Run folder layout::

    run_dir/split.json             patient split (train/val/test, seed, split_id)
    run_dir/config.json            the resolved TrainConfig
    run_dir/checkpoints/latest.pt  training state for resume (model, EMA, optimizer, scaler, step, RNG, ...)
    run_dir/checkpoints/best.pt    model checkpoint (EMA weights) with the best validation whole-tumour Dice
    run_dir/model.pt               model checkpoint (EMA weights) at the end of training

After training, the checkpoint(s) of a sampled model get their volume-interval calibration, fitted on the
validation patients (``calibrate_checkpoint``; longitudinal.models.calibration explains why and how).

Resume is exact on CPU: the sample stream is a pure function of (seed, sample position), the loader has its own
generator, and every global RNG is restored; a run stopped after n steps and resumed reaches the same weights as
an uninterrupted run (given the same checkpoint cadence).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from longitudinal.data.dataset import (
    ForecastDataset,
    StoreReader,
    StreamSampler,
    collate_batch,
    reset_worker_reader,
)
from longitudinal.data.splits import Split, cohort_order_keys, content_order, make_split
from longitudinal.models.base import build_model
from longitudinal.models.checkpoint import Checkpoint, DataSettings
from longitudinal.predict import resolve_device
from longitudinal.runtime import tune_cpu_allocator
from longitudinal.training.checkpoint import (
    load_train_state,
    rng_state,
    save_model_checkpoint,
    save_train_state,
    set_rng_state,
)
from longitudinal.training.config import TrainConfig
from longitudinal.training.logger import MetricLogger, NullLogger
from longitudinal.training.serving import fit_serving
from longitudinal.training.steps import (
    EMA,
    DistContext,
    LossModule,
    all_true,
    init_distributed,
    leave_distributed,
    lr_at,
    seed_everything,
    select_precision,
    wait_for_all,
)
from longitudinal.training.validation import ValidationSet, calibrate_checkpoint, validate, validation_set

if TYPE_CHECKING:
    pass

# Config fields that may change when resuming (how long to train); anything else must match the saved run.
_RESUMABLE_CHANGES = {"steps", "epochs", "budget_s", "eval_every", "ckpt_every", "log_every", "num_workers",
                      "device", "read_cache_mb", "val_samples", "calib_samples", "calib_targets"}


@dataclass
class FitResult:
    """checkpoint: best validation model checkpoint (the final one when there is no validation set).
    best_metric: best val whole-tumour Dice (None without validation). wall_s: training seconds over all
    resumes. samples_per_s: training throughput of this invocation."""

    checkpoint: Path
    final_checkpoint: Path
    best_metric: float | None
    best_step: int | None
    steps: int
    wall_s: float
    split: Split
    split_path: Path
    run_dir: Path
    samples_per_s: float = 0.0
    final_val: dict[str, float] = field(default_factory=dict)


def _resolve_split(cfg: TrainConfig, store_url: str, run_dir: Path, resume: bool) -> tuple[Split, Path]:
    from storage.store import CohortStore

    path = run_dir / "split.json"
    if resume and path.exists():
        return Split.load(path), path
    pids = CohortStore.open(store_url).patient_ids()
    split = make_split(pids, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                       order_keys=cohort_order_keys(store_url))
    split.save(path)
    return split, path


def _store_geometry(store_url: str, pid: str) -> tuple[tuple[str, ...], tuple[float, float, float]]:
    from storage.store import CohortStore

    arr = CohortStore.open(store_url).arrays(pid)
    return tuple(arr.channels), tuple(float(s) for s in arr.spacing_mm)  # type: ignore[return-value]


def fit(
    config: TrainConfig,
    store_url: str,
    run_dir: Path,
    logger: MetricLogger | None = None,
    resume: bool = True,
    progress: Callable[[str], None] | None = print,
    reader: StoreReader | None = None,
) -> FitResult:
    """Train ``config.model`` on the train split of ``store_url``; write checkpoints under ``run_dir``.

    Stops at the first of ``steps`` / ``epochs`` / ``budget_s``. With ``resume`` and an existing
    ``run_dir/checkpoints/latest.pt`` training continues from it (same split, config checked for
    incompatible changes). Non-trainable kinds (baselines) are only validated and saved. ``reader``
    replaces the lazy store reader of the training samples (the throughput benchmark passes an
    `InMemoryReader`).

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel: gloo on CPU / NCCL on CUDA (one GPU per
    LOCAL_RANK), each rank takes every WORLD_SIZE-th batch of the sample stream, gradients are averaged by
    DistributedDataParallel, and only rank 0 validates, logs, prints and writes files; ``steps`` counts
    global steps (WORLD_SIZE x batch_size samples each). The process group is joined here unless the caller
    joined it already (``tracking.run.run_training`` does, to keep the ranks together after training); the
    other ranks wait for rank 0's final validation and calibration on a long-timeout barrier.
    """
    dist_ctx = DistContext.from_env()
    own_group = init_distributed(dist_ctx, config.device)
    try:
        return _fit(config, store_url, Path(run_dir), logger, resume, progress, reader, dist_ctx)
    finally:
        if own_group:
            leave_distributed()


def _fit(
    config: TrainConfig,
    store_url: str,
    run_dir: Path,
    logger: MetricLogger | None,
    resume: bool,
    progress: Callable[[str], None] | None,
    reader: StoreReader | None,
    dist_ctx: DistContext,
) -> FitResult:
    main = dist_ctx.is_main
    logger = (logger or NullLogger()) if main else NullLogger()
    say = (progress or (lambda _msg: None)) if main else (lambda _msg: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    latest_path, best_path, final_path = ckpt_dir / "latest.pt", ckpt_dir / "best.pt", run_dir / "model.pt"
    device = resolve_device(config.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if dist_ctx.active and device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank)
        torch.cuda.set_device(device)
    amp_dtype, use_scaler = select_precision(config.precision, device)

    state = load_train_state(latest_path) if (resume and latest_path.exists()) else None
    if state is not None:
        _check_resume_config(state["config"], config)
    if main:
        split, split_path = _resolve_split(config, store_url, run_dir, resume=state is not None or resume)
    if dist_ctx.active:
        torch.distributed.barrier()
    if not main:
        split_path = run_dir / "split.json"
        split = Split.load(split_path)
    if state is not None and state.get("split_id") != split.split_id:
        raise ValueError(f"split.json ({split.split_id}) does not match the checkpoint ({state.get('split_id')})")
    if not split.train:
        raise ValueError("the training split is empty")
    if main:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    channels, spacing = _store_geometry(store_url, split.train[0])

    if state is None:
        seed_everything(config.seed)
    model = build_model(config.model, dict(config.model_options), in_channels=len(channels)).to(device)
    ema = EMA(model, config.ema_decay)
    ema_model = copy.deepcopy(model).eval()
    data = DataSettings(max_context=config.max_context, normalize=config.normalize, fov=config.fov,
                        fov_margin_mm=config.fov_margin_mm)
    meta_base = {"split_id": split.split_id, "store_url": store_url, "train_config": config.to_dict()}

    if state is None:
        logger.log_params(config.flat_params())
        logger.set_tags({"split_id": split.split_id, "model_kind": config.model, "store_url": store_url})
        logger.log_artifact(split_path)
        logger.log_artifact(run_dir / "config.json")

    val_batches = validation_set(config, store_url, split) if main else ValidationSet({}, [])
    if state is None and val_batches:
        base = validate({k: build_model(k) for k in ("lci", "linear")}, val_batches, config, device)
        logger.log_metrics({f"val_{m}_{k}": v for m, d in base.items() for k, v in d.items()}, step=0)
        say("baselines on validation: " + ", ".join(f"{m} dice {d['dice_whole']:.3f} vol.err "
                                                       f"{d['volume_error_ml']:.2f} ml" for m, d in base.items()))

    if not model.trainable:
        val = validate({config.model: model}, val_batches, config, device).get(config.model, {}) \
            if val_batches else {}
        if main:
            save_model_checkpoint(final_path, model, channels, spacing, config.crop_size, data,
                                  {**meta_base, "step": 0})
        return FitResult(checkpoint=final_path, final_checkpoint=final_path, best_metric=val.get("dice_whole"),
                         best_step=0 if val else None, steps=0, wall_s=0.0, split=split, split_path=split_path,
                         run_dir=run_dir, final_val=val)

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    step, elapsed_before, best, best_step = 0, 0.0, None, None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"cannot resume {latest_path}: its weights do not fit the current {config.model!r} "
                             f"model ({str(exc).splitlines()[-1].strip()}); use a new run folder or "
                             "resume=False") from None
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        best, best_step = state.get("best_metric"), state.get("best_step")
        set_rng_state(state["rng"])
        say(f"resumed {run_dir} at step {step} ({elapsed_before:.0f} s trained)")

    # Patients in the order of their scans' content, not of their pseudonyms: the sample stream is then the same
    # under any site's pseudonym key (item i is the i-th patient of this order).
    train_ds = ForecastDataset(store_url, content_order(split.train, store_url), config.data_config(train=True),
                               seed=config.seed, reader=reader)
    if len(train_ds) == 0:
        raise ValueError(f"no training patient has >= 2 scans (skipped: {train_ds.skipped})")
    max_steps = _max_steps(config, len(train_ds))
    loader = DataLoader(
        train_ds, batch_size=config.batch_size,
        sampler=StreamSampler(len(train_ds), seed=config.seed, start=step * config.batch_size * dist_ctx.world,
                              rank=dist_ctx.rank, world=dist_ctx.world, batch_size=config.batch_size),
        num_workers=config.num_workers, collate_fn=collate_batch, pin_memory=device.type == "cuda",
        persistent_workers=False, worker_init_fn=reset_worker_reader,
        generator=torch.Generator().manual_seed(config.seed + step),
    )

    ddp = None
    if dist_ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        # Same init on every rank is broadcast by DDP; the noise of the flow paths differs per rank.
        ddp = DistributedDataParallel(LossModule(model), device_ids=[device.index] if device.type == "cuda"
                                      else None)
        torch.manual_seed(config.seed + 7919 * dist_ctx.rank + step)

    def save_state(until: float | None = None) -> None:
        if not main:
            return
        save_train_state({
            "format": "train_state", "step": step,
            "elapsed_s": elapsed_before + ((until or time.perf_counter()) - t0),
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else {}, "rng": rng_state(), "best_metric": best,
            "best_step": best_step, "config": config.to_dict(), "split_id": split.split_id,
        }, latest_path)

    last_val: dict[str, Any] = {"step": None, "val": {}}

    def evaluate_now() -> dict[str, float]:
        nonlocal best, best_step
        if not val_batches:
            return {}
        if last_val["step"] == step:
            return last_val["val"]
        ema_model.load_state_dict(ema.shadow)
        val = validate({config.model: ema_model}, val_batches, config, device)[config.model]
        logger.log_metrics({f"val_{k}": v for k, v in val.items()}, step=step)
        if best is None or val["dice_whole"] > best:
            best, best_step = val["dice_whole"], step
            save_model_checkpoint(best_path, model, channels, spacing, config.crop_size, data,
                                  {**meta_base, "step": step, "val": val}, state_dict=ema.shadow)
        say(f"step {step}: val dice {val['dice_whole']:.3f} vol.err {val['volume_error_ml']:.2f} ml "
            f"(best {best:.3f} at {best_step})")
        last_val.update(step=step, val=val)
        return val

    t0 = time.perf_counter()
    t_window, n_window, losses, gnorms, n_bad = time.perf_counter(), 0, [], [], 0
    samples_seen = 0
    model.train()
    it = iter(loader)
    while step < max_steps:
        over = config.budget_s is not None and elapsed_before + (time.perf_counter() - t0) >= config.budget_s
        if dist_ctx.active:  # rank 0's clock decides, so every rank stops at the same step
            flag = torch.tensor([1.0 if over else 0.0], device=device)
            torch.distributed.broadcast(flag, 0)
            over = bool(flag.item() > 0)
        if over:
            say(f"budget of {config.budget_s:.0f} s reached at step {step}")
            break
        batch = next(it).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = ddp(batch) if ddp is not None else model.loss(batch)
        opt.zero_grad(set_to_none=True)
        if not all_true(bool(torch.isfinite(loss)), dist_ctx, device):
            n_bad += 1
            if n_bad >= 10:
                raise FloatingPointError(f"10 consecutive non-finite losses at step {step}")
            continue
        n_bad = 0
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(opt)
            gnorms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)))
        scaler.step(opt)
        scaler.update()
        ema.update(model)
        step += 1
        losses.append(float(loss.detach()))
        n_window += batch.context_images.shape[0] * dist_ctx.world
        samples_seen += batch.context_images.shape[0] * dist_ctx.world
        if step % config.log_every == 0 or step == max_steps:
            dt = time.perf_counter() - t_window
            m = {"train_loss": float(np.mean(losses)), "lr": lr_at(step - 1, config),
                 "samples_per_s": n_window / max(dt, 1e-9)}
            if gnorms:
                m["grad_norm"] = float(np.mean(gnorms))
            logger.log_metrics(m, step=step)
            say(f"step {step}/{max_steps if max_steps < 10**12 else '-'} loss {m['train_loss']:.4f} "
                f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s "
                f"{elapsed_before + time.perf_counter() - t0:.0f} s")
            t_window, n_window, losses, gnorms = time.perf_counter(), 0, [], []
        if step % config.eval_every == 0:
            evaluate_now()
        if step % config.ckpt_every == 0:
            save_state()
    del it
    t_end = time.perf_counter()
    train_s = t_end - t0
    final_val = evaluate_now()
    save_state(until=t_end)  # the budget counts training, not this final validation
    checkpoint = best_path if best_path.exists() else final_path
    if main:
        # A finished run resumed again (nothing trained) keeps its final checkpoint, with its serving choice and
        # calibration, rather than writing the same weights without them.
        if not (final_path.exists() and Checkpoint.load(final_path).provenance.get("step") == step):
            save_model_checkpoint(final_path, model, channels, spacing, config.crop_size, data,
                                  {**meta_base, "step": step, "val": final_val}, state_dict=ema.shadow)
        if config.serve_baselines and model.trainable:
            # The choice per horizon bin needs as many validation targets as the calibration (a few per bin
            # from the periodic validation's set would make it a coin toss).
            wider = max(config.val_targets, config.calib_targets)
            serving_set = (val_batches if wider == config.val_targets else
                           validation_set(config.model_copy(update={"val_targets": wider}), store_url, split))
            for path in dict.fromkeys([checkpoint, final_path]):
                fit_serving(path, serving_set, config, device, say)
        if model.stochastic and split.val and config.calib_targets > 0:
            for path in dict.fromkeys([checkpoint, final_path]):
                cal = calibrate_checkpoint(path, store_url, split.val, config, device, say)
                if path == checkpoint:
                    logger.log_metrics({"calib_n_targets": cal["whole"].n,
                                        "calib_n_patients": cal["whole"].n_patients}, step=step)
        logger.log_artifact(final_path)
    # Calibration on rank 0 can outlast a collective's timeout: the others wait on the long barrier.
    wait_for_all(dist_ctx)
    wall = elapsed_before + train_s
    say(f"trained {step} steps in {wall:.0f} s; checkpoint {checkpoint}")
    return FitResult(checkpoint=checkpoint, final_checkpoint=final_path, best_metric=best, best_step=best_step,
                     steps=step, wall_s=wall, split=split, split_path=split_path, run_dir=run_dir,
                     samples_per_s=samples_seen / max(train_s, 1e-9), final_val=final_val)


def _max_steps(cfg: TrainConfig, n_items: int) -> int:
    limits = []
    if cfg.steps is not None:
        limits.append(cfg.steps)
    if cfg.epochs is not None:
        limits.append(math.ceil(cfg.epochs * n_items / cfg.batch_size))
    return min(limits) if limits else 10**12


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        raise ValueError("cannot resume: the config differs from the checkpoint in "
                         + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in diff)
                         + "; use a new run folder or resume=False")
