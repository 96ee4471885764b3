"""``run_training``: split, fit, evaluate against the baselines, log, register, promote -- resumable.

The run folder is keyed by (training config, store content): ``<runs>/<kind>-<key>``. A rerun with the same
config and store finds the folder, resumes ``fit`` from its checkpoint, reopens the SAME MLflow run (its id is
kept in ``tracking.json`` and as the run tag ``run_key``) and registers at most one version per run (the
registry is searched for a version of that run before one is created). The candidate is gated on the
validation split against LCI and the current champion, all scored on the same targets.

Under torchrun (WORLD_SIZE > 1) every rank calls ``run_training``: all of them train (``fit`` is data-parallel),
but only rank 0 opens the tracking store (creates or reopens the run, logs, evaluates, calibrates, registers
and gates). The other ranks never touch MLflow -- two processes opening a fresh sqlite database migrate its
schema at once and break it -- they learn the run folder from rank 0, train, wait until rank 0 is done and
return None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from longitudinal.models.checkpoint import Checkpoint
from longitudinal.predict import Predictor
from longitudinal.settings import Settings
from longitudinal.tracking import uri as uri_mod
from longitudinal.tracking.logged_model import log_forecaster, slim_checkpoint
from longitudinal.tracking.logger import MlflowLogger, flatten
from longitudinal.tracking.registry import (
    CHAMPION,
    GateDecision,
    GateMetrics,
    alias_version,
    apply_decision,
    find_version_for_run,
    gate,
    register_version,
    resolve_model_ref,
)
from longitudinal.tracking.run_figures import log_run_figures

log = logging.getLogger(__name__)
STATE_FILE = "tracking.json"
CANDIDATE = "candidate"
CHAMPION_NAME = "champion"


@dataclass
class TrainOutcome:
    """What one (possibly resumed) training produced.

    run_dir: local folder with checkpoints and the split. checkpoint: the model-only checkpoint that was logged.
    model_uri: ``models:/m-...`` of the logged pyfunc. version/aliases: the registry entry of this run.
    decision: the gate's decision (None when the version existed already and was gated before).
    val_rows / test_rows: per-horizon evaluation rows (candidate named ``candidate``, plus lci, linear and the
    previous champion on validation). created_version: False when a rerun found the version of this run.
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    run_dir: Path
    checkpoint: Path
    model_uri: str
    registered_name: str
    version: str
    aliases: list[str]
    created_version: bool
    resumed: bool
    decision: GateDecision | None
    split_id: str
    val_rows: list[dict[str, Any]] = field(default_factory=list)
    test_rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-able summary for CLIs and flows."""
        return {
            "run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri,
            "run_dir": str(self.run_dir), "model_uri": self.model_uri, "registered_name": self.registered_name,
            "version": self.version, "aliases": self.aliases, "created_version": self.created_version,
            "resumed": self.resumed, "split_id": self.split_id, "wall_s": round(self.wall_s, 2),
            "decision": None if self.decision is None else self.decision.tags(),
        }


# --- identities ----------------------------------------------------------------------------------------
def config_dict(config: Any) -> dict[str, Any]:
    """A training config (dataclass, pydantic model or dict) as a plain JSON-able dict."""
    if is_dataclass(config):
        d = asdict(config)
    elif hasattr(config, "model_dump"):
        d = config.model_dump()
    else:
        d = dict(config)
    return json.loads(json.dumps(d, default=str))


def store_hash(store_url: str) -> str:
    """Hash of the store's content: every (patient, session, days, content sha256) of the index."""
    from storage.store import CohortStore

    idx = CohortStore.open(store_url).index()
    h = hashlib.sha256()
    for row in idx.sort_values(["patient_id", "days"]).itertuples(index=False):
        h.update(f"{row.patient_id}|{row.session}|{float(row.days):.6f}|{row.content_sha256}\n".encode())
    return h.hexdigest()


def run_key(config: dict[str, Any], store_digest: str, world_size: int = 1) -> str:
    """Key of a run folder: config + store content (+ the number of data-parallel processes when more than
    one: a step then averages ``world_size`` batches, so it is another training) (16 hex chars)."""
    blob = json.dumps(config, sort_keys=True) + "|" + store_digest
    if world_size > 1:
        blob += f"|world={int(world_size)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_version() -> str:
    """Package version plus the git commit of the source tree when available (``0.1.0+g1234abc``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("longitudinal")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


# --- the run -------------------------------------------------------------------------------------------
def _open_run(settings: Settings, run_dir: Path, key: str, experiment_id: str, name: str) -> tuple[str, bool]:
    """Reuse this run folder's MLflow run (state file, else the ``run_key`` tag), or create one.
    Returns (run_id, resumed)."""
    client = uri_mod.client(settings)
    state = run_dir / STATE_FILE
    if state.exists():
        rid = json.loads(state.read_text()).get("run_id")
        try:
            if rid and client.get_run(rid).info.lifecycle_stage == "active":
                return rid, True
        except MlflowException:
            pass
    found = client.search_runs([experiment_id], f"tags.run_key = '{key}'", max_results=1)
    if found:
        rid, resumed = found[0].info.run_id, True
    else:
        rid, resumed = client.create_run(experiment_id, run_name=name, tags={"run_key": key}).info.run_id, False
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": rid, "tracking_uri": settings.tracking_uri, "run_key": key}))
    tmp.replace(state)
    return rid, resumed


def _train_config(train_config: Any) -> Any:
    """A TrainConfig from a TrainConfig, a dict of its fields or a YAML/JSON path (missing fields take the
    shipped defaults)."""
    from longitudinal.training.config import DEFAULT_TRAIN_CONFIG, TrainConfig, load_train_config

    if isinstance(train_config, TrainConfig):
        return train_config
    if isinstance(train_config, str | Path):
        return load_train_config(Path(train_config))
    return TrainConfig(**{**DEFAULT_TRAIN_CONFIG.to_dict(), **dict(train_config)})


def _eval_config(n_samples: int = 8) -> Any:
    from longitudinal.evaluation.harness import EvalConfig

    return EvalConfig(n_samples=int(n_samples))


def run_training(
    settings: Settings,
    store_url: str,
    train_config: Any,
    register_as: str | None = None,
    flow_run_id: str | None = None,
    experiment: str = uri_mod.EXPERIMENT_NAME,
    system_metrics_interval_s: float = 2.0,
    eval_samples: int = 8,
    engine: Any = None,
) -> TrainOutcome | None:
    """Split, fit (resuming), evaluate on validation (gate) and test (report), log, register once, promote.

    train_config: ``longitudinal.training.TrainConfig``, a dict of its fields, or a YAML/JSON path.
    register_as: registered model name (default ``Settings.registered_model_name``).
    flow_run_id: Prefect flow-run id recorded as a tag when the flow calls this.
    eval_samples: forecast samples per target for stochastic models in the gate/test evaluation and figures.
    engine: a ``longitudinal.evaluation.distributed.DaskEngine``: the end-of-training calibration and the
        validation/test evaluation run on that Dask cluster (same figures as in this process).

    Under torchrun: the outcome on rank 0, None on the other ranks (module docstring).
    """
    from contextlib import nullcontext

    from longitudinal.training.steps import DistContext, init_distributed, leave_distributed

    cfg = _train_config(train_config)
    dist_ctx = DistContext.from_env()
    own_group = init_distributed(dist_ctx, cfg.device)
    try:
        if not dist_ctx.is_main:
            _follow_main(cfg, store_url, dist_ctx)
            return None
        with engine if engine is not None else nullcontext():
            return _run_training_main(settings, store_url, cfg, register_as, flow_run_id, experiment,
                                      system_metrics_interval_s, eval_samples, dist_ctx)
    finally:
        if own_group:
            leave_distributed()


def _follow_main(cfg: Any, store_url: str, dist_ctx: Any) -> None:
    """A non-zero rank of a tracked torchrun launch: train in rank 0's run folder (or not at all when rank 0
    found the run finished), then wait for rank 0's evaluation and registration. No tracking call at all."""
    from longitudinal.training.fit import fit
    from longitudinal.training.steps import broadcast_from_main, wait_for_all

    plan = broadcast_from_main(None, dist_ctx)
    if plan["train"]:
        fit(cfg, store_url, Path(plan["run_dir"]), None, resume=True, progress=None)
    wait_for_all(dist_ctx)


def _run_training_main(
    settings: Settings, store_url: str, cfg: Any, register_as: str | None, flow_run_id: str | None,
    experiment: str, system_metrics_interval_s: float, eval_samples: int, dist_ctx: Any,
) -> TrainOutcome:
    """``run_training`` of rank 0 (or of the one process)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from longitudinal.training.fit import fit
    from longitudinal.training.steps import broadcast_from_main, wait_for_all

    t0 = time.perf_counter()
    name = register_as or settings.registered_model_name
    cfg_dict = config_dict(cfg)
    kind = str(cfg.model)
    digest = store_hash(store_url)
    key = run_key(cfg_dict, digest, dist_ctx.world)
    run_dir = settings.runs_path / f"{kind}-{key}"
    tracking_uri = uri_mod.configure(settings)
    experiment_id = uri_mod.ensure_experiment(settings, experiment)
    run_id, resumed = _open_run(settings, run_dir, key, experiment_id, f"{kind}-{key[:8]}")
    done = _finished(settings, name, run_id, run_dir, experiment_id, t0) if resumed else None
    # The other ranks train only when this rank does, in this run folder (they never compute it themselves:
    # one place decides it).
    broadcast_from_main({"run_dir": str(run_dir), "train": done is None}, dist_ctx)
    if done is not None:
        wait_for_all(dist_ctx)
        return done
    logger = MlflowLogger(run_id, tracking_uri)
    logger.log_params(flatten(cfg_dict))
    tags = {"store_url": store_url, "store_hash": digest, "code_version": code_version(), "model_kind": kind,
            "registered_name": name, "run_dir": str(run_dir)}
    if flow_run_id:
        tags["prefect_flow_run_id"] = str(flow_run_id)
    if dist_ctx.active:
        tags["distributed.world_size"] = str(dist_ctx.world)
    logger.set_tags(tags)

    monitor = SystemMetricsMonitor(run_id, sampling_interval=system_metrics_interval_s, resume_logging=resumed,
                                   tracking_uri=tracking_uri)
    # The run was created (or reopened) by id; fluent start makes it the active run for log_model.
    mlflow.start_run(run_id=run_id)
    monitor.start()
    ok = False
    try:
        t_fit = time.perf_counter()
        result = fit(cfg, store_url, run_dir, logger, resume=True)
        logger.log_metrics({"timing/fit_s": time.perf_counter() - t_fit})
        split = result.split
        logger.set_tags({"split_id": split.split_id})
        logger.log_json({"train": list(split.train), "val": list(split.val), "test": list(split.test),
                         "seed": split.seed, "split_id": split.split_id}, "split.json")
        logger.log_json(cfg_dict, "config.json")

        model_ckpt = run_dir / "logged_model.pt"  # fit owns run_dir/model.pt
        slim_checkpoint(Path(result.checkpoint), model_ckpt)
        candidate = Predictor.from_checkpoint(Checkpoint.load(model_ckpt))
        outcome = _evaluate_register_promote(settings, name, run_id, tracking_uri, logger, candidate,
                                             model_ckpt, _eval_config(eval_samples), store_url, split)
        ok = True
    finally:
        _stop_monitor(monitor, logger)
        mlflow.end_run(status="FINISHED" if ok else "FAILED")
    # Only after success: a failed rank 0 exits and torchrun ends the waiting ranks.
    wait_for_all(dist_ctx)
    model_uri, version, created, aliases, decision, val_rows, test_rows = outcome
    return TrainOutcome(run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri, run_dir=run_dir,
                        checkpoint=model_ckpt, model_uri=model_uri, registered_name=name, version=version,
                        aliases=aliases, created_version=created, resumed=resumed, decision=decision,
                        split_id=split.split_id, val_rows=val_rows, test_rows=test_rows,
                        wall_s=time.perf_counter() - t0)


def _stop_monitor(monitor: Any, logger: MlflowLogger) -> None:
    """Stop system-metrics sampling. MLflow's monitor only publishes after a full sampling interval, so a run
    shorter than that would carry no system metrics: publish one sample then."""
    monitor.finish()
    if not any(k.startswith("system/") for k in logger.client.get_run(logger.run_id).data.metrics):
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def _finished(settings: Settings, name: str, run_id: str, run_dir: Path, experiment_id: str, t0: float
              ) -> TrainOutcome | None:
    """The outcome of a run that already completed (FINISHED, registered and gated), else None: rerunning a
    finished training is a no-op, not a second evaluation."""
    client = uri_mod.client(settings)
    mv = find_version_for_run(client, name, run_id)
    run = client.get_run(run_id)
    if mv is None or "gate.decision" not in (mv.tags or {}) or run.info.status != "FINISHED":
        return None
    return TrainOutcome(run_id=run_id, experiment_id=experiment_id, tracking_uri=settings.tracking_uri,
                        run_dir=run_dir, checkpoint=run_dir / "logged_model.pt", model_uri=str(mv.source),
                        registered_name=name, version=str(mv.version),
                        aliases=sorted(client.get_model_version(name, str(mv.version)).aliases or []),
                        created_version=False, resumed=True, decision=None,
                        split_id=run.data.tags.get("split_id", ""), wall_s=time.perf_counter() - t0)


def _evaluate_register_promote(
    settings: Settings, name: str, run_id: str, tracking_uri: str, logger: MlflowLogger, candidate: Predictor,
    model_ckpt: Path, eval_cfg: Any, store_url: str, split: Any,
) -> tuple[str, str, bool, list[str], GateDecision | None, list[dict[str, Any]], list[dict[str, Any]]]:
    from longitudinal.evaluation.harness import evaluate_models
    from longitudinal.evaluation.strata import stratum_rows

    client = uri_mod.client(settings)
    val_ids = list(split.val) or list(split.test)
    logger.set_tags({"gate.split": "val" if split.val else "test (no validation patients)"})

    # The version of this run may exist already (a rerun after a crash past registration): never gate twice.
    existing = find_version_for_run(client, name, run_id)
    gated_before = existing is not None and "gate.decision" in (existing.tags or {})

    val_models = {CANDIDATE: candidate}
    champ = None if gated_before else alias_version(client, name, CHAMPION)
    if champ is not None:
        champ_ckpt = Checkpoint.load(resolve_model_ref(f"{name}/{champ.version}", settings).checkpoint)
        val_models[CHAMPION_NAME] = Predictor.from_checkpoint(champ_ckpt)
    tick = time.perf_counter()
    val = evaluate_models(val_models, store_url, val_ids, eval_cfg)
    test = evaluate_models({CANDIDATE: candidate}, store_url, list(split.test), eval_cfg)
    timing = {"timing/evaluate_s": time.perf_counter() - tick}
    tick = time.perf_counter()
    logger.log_table(val.rows, "validation", prefix="val")
    # The held-out table per treatment stratum too (test/treated/..., test/untreated/...); the gate uses all targets.
    logger.log_table(stratum_rows(test), "test", prefix="test")
    log_run_figures(logger, candidate, store_url, list(split.test) or val_ids, test.rows, n_samples=eval_cfg.n_samples)
    timing["timing/tables_figures_s"] = time.perf_counter() - tick
    tick = time.perf_counter()

    model_uri = log_forecaster(model_ckpt, run_id, tracking_uri)
    timing["timing/log_model_s"] = time.perf_counter() - tick
    logger.log_metrics(timing)
    model_id = model_uri.removeprefix("models:/")
    mv, created = register_version(client, name, model_uri, run_id, model_id,
                                   {"model_kind": candidate.kind, "split_id": split.split_id,
                                    "intervals": intervals_tag(candidate)})
    decision = None
    if not gated_before:
        cand = GateMetrics.from_rows(val.rows, CANDIDATE)
        lci = GateMetrics.from_rows(val.rows, "lci")
        champ_metrics = GateMetrics.from_rows(val.rows, CHAMPION_NAME) if champ is not None else None
        decision = gate(cand, lci, champ_metrics, str(champ.version) if champ is not None else None)
        aliases = apply_decision(client, name, mv.version, decision)
        logger.set_tags({f"registry.{k}": v for k, v in decision.tags().items()})
    else:
        aliases = sorted(client.get_model_version(name, mv.version).aliases)
    logger.set_tags({"registry.name": name, "registry.version": str(mv.version)})
    return model_uri, str(mv.version), created, aliases, decision, val.rows, test.rows


def intervals_tag(predictor: Predictor) -> str:
    """The registry version tag ``intervals``: what a consumer's volume intervals will rest on."""
    cal = predictor.calibration.get("whole")
    if cal is not None:
        return f"calibrated: {cal.summary()} ({cal.form} scores)"
    return "uncalibrated samples" if predictor.stochastic else "point forecast"


def default_train_config() -> Any:
    """The shipped TrainConfig (``longitudinal.training``'s default)."""
    from longitudinal.training.config import DEFAULT_TRAIN_CONFIG

    return DEFAULT_TRAIN_CONFIG


def evaluate_model_ref(
    ref: str, settings: Settings, store_url: str, patient_ids: list[str] | None = None, n_samples: int = 8,
    engine: Any = None, progress: Any = None,
) -> Any:
    """``longitudinal evaluate --model REF``: REF is a baseline kind (``lci``, ``linear``), a local checkpoint,
    ``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...`` or ``runs:/...``; registry references are resolved (and
    downloaded) with ``resolve_model_ref``. ``engine``: a ``DaskEngine`` to forecast the patients on (the same
    table); ``progress``: called with a line as targets (serial) or patients (Dask) finish. Returns the
    harness's EvaluationReport."""
    from longitudinal.evaluation.harness import evaluate_ref
    from longitudinal.models.base import closed_form_kinds

    local = ref if (ref in closed_form_kinds() or Path(ref).exists()) else str(resolve_model_ref(ref, settings).checkpoint)
    return evaluate_ref(local, store_url, patient_ids, progress=progress, n_samples=n_samples, engine=engine)
