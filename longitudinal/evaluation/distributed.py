"""Evaluation, calibration and batch forecasts on a Dask cluster: the one Predictor mapped over patients.

Where: ``DaskEngine(address="tcp://HOST:8786")`` is an existing scheduler (the address ``longitudinal ingest
--dask-address`` uses); ``DaskEngine(workers=N)`` starts a local cluster of N worker processes with one thread
each. The cluster is reached (or started) at first use. ``with engine:`` keeps one cluster for everything inside
and makes it the default engine of ``evaluate_models`` and ``fit_volume_calibration`` there, so callers that do
not pass an engine (the end-of-training calibration inside ``fit``, ``longitudinal calibrate``) run on it too.

Same results as in one process: each patient is one task. The worker rebuilds every Predictor from its weights
(``PredictorSpec``: kind, config, CPU state dict, calibration and input settings; never a live model, which may
sit on a GPU of another machine), reads the patient from the store by URL and forecasts the same (patient, cut)
groups with the same seeds: a Predictor call's sampling seed is a function of the caller's seed and the
context's days, not of what ran before. The records come back in the order of the serial path
(``harness.group_targets``), so the table is the same to float precision (torch's own thread count can move
the last bits of a convolution). Parallelism is across patients: torch runs one thread per worker thread.

What travels: the weights once per worker (scattered), the store location (a local path is made absolute, so
every worker must see it at the same path, as for ingest, or the store lives on object storage), patient ids,
targets and the EvalConfig; floats come back (records, or volumes and maps of batch forecasts).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longitudinal.data.context import PatientSeries
from longitudinal.data.dataset import EvalItem
from longitudinal.evaluation.harness import (
    EvalConfig,
    EvaluationReport,
    aggregate,
    group_targets,
    score_group,
)
from longitudinal.models.base import build_model
from longitudinal.models.checkpoint import DataSettings
from longitudinal.predict import Prediction, Predictor

_CURRENT: contextvars.ContextVar[DaskEngine | None] = contextvars.ContextVar("longitudinal_dask_engine",
                                                                             default=None)


def current_engine() -> DaskEngine | None:
    """The engine entered by the caller (``with DaskEngine(...):``), else None (this process)."""
    return _CURRENT.get()


class DaskEngine:
    """A Dask cluster to map patients over: ``address`` of an existing scheduler (``tcp://HOST:PORT``), or a
    local cluster of ``workers`` processes with one thread each when ``address`` is None.

    Reached lazily by ``client()``; ``with engine:`` keeps the cluster until the block ends (closing it then
    unless it was open before) and makes it the default engine inside (module docstring). Raises ValueError
    for an address without a scheme or fewer than one local worker."""

    def __init__(self, address: str | None = None, workers: int = 2) -> None:
        if address is not None and "://" not in address:
            raise ValueError(f"a Dask scheduler address looks like tcp://HOST:8786, got {address!r}")
        if address is None and int(workers) < 1:
            raise ValueError(f"a local Dask cluster needs at least 1 worker, got {workers}")
        self.address = address
        self.workers = int(workers)
        self._client: Any = None
        self._cluster: Any = None
        self._tokens: list[contextvars.Token] = []
        self._open_before = False

    def describe(self) -> str:
        """One line naming the cluster (for CLI output)."""
        if self.address:
            return f"the Dask cluster at {self.address}"
        return f"a local Dask cluster of {self.workers} worker process{'es' if self.workers != 1 else ''}"

    def __enter__(self) -> DaskEngine:
        if not self._tokens:
            self._open_before = self._client is not None
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._tokens.pop())
        if not self._tokens and not self._open_before:  # close what the block opened, nothing else
            self.close()

    def client(self) -> Any:
        """The ``distributed.Client`` (connecting, or starting the local cluster, on first use). Raises OSError
        (TimeoutError) when the scheduler cannot be reached."""
        if self._client is None:
            from distributed import Client, LocalCluster

            if self.address:
                self._client = Client(self.address, timeout="30s", set_as_default=False)
            else:
                # Processes, not threads: each worker gets its own interpreter, torch and allocator.
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                             dashboard_address=None, silence_logs=logging.ERROR)
                self._client = Client(self._cluster, set_as_default=False)
        return self._client

    @contextmanager
    def session(self) -> Iterator[Any]:
        """The client for one call; a client opened here is closed after it unless the engine is entered."""
        opened = self._client is None
        try:
            yield self.client()
        finally:
            if opened and not self._tokens:
                self.close()

    def close(self) -> None:
        """Disconnect (and stop the local cluster); the next use reconnects."""
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


@dataclass(frozen=True)
class PredictorSpec:
    """What a worker needs to rebuild a Predictor exactly: the model's kind, config, weights (CPU tensors) and
    volume calibration, and the input settings (crop size in voxels, context size and normalisation, channels,
    grid spacing in mm). ``device``: "cpu" when the original ran on the CPU, else "auto" (the worker's GPU
    when it has one)."""

    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    calibration: dict[str, Any]
    crop_size: tuple[int, ...]
    data: DataSettings
    channels: tuple[str, ...] | None
    spacing_mm: tuple[float, ...] | None
    device: str

    @classmethod
    def of(cls, predictor: Predictor) -> PredictorSpec:
        model = predictor.model
        return cls(kind=predictor.kind, config=dict(model.config_dict()),
                   state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                   calibration=dict(predictor.calibration), crop_size=tuple(predictor.crop_size),
                   data=predictor.data, channels=predictor.channels, spacing_mm=predictor.spacing_mm,
                   device="cpu" if predictor.device.type == "cpu" else "auto")

    def build(self) -> Predictor:
        model = build_model(self.kind, dict(self.config))
        model.load_state_dict(self.state_dict)
        model.volume_calibration = dict(self.calibration)
        return Predictor(model, self.crop_size, self.data, self.channels, self.spacing_mm, self.device)


@dataclass(frozen=True)
class _Shared:
    """The models of one distributed call, scattered once to every worker. ``token`` names the call, so a
    worker builds the Predictors once for all of its patients."""

    token: str
    specs: dict[str, PredictorSpec]


_worker_lock = threading.Lock()
_worker_predictors: dict[str, dict[str, Predictor]] = {}


def _predictors_on_worker(shared: _Shared) -> dict[str, Predictor]:
    with _worker_lock:
        got = _worker_predictors.get(shared.token)
        if got is None:
            _worker_predictors.clear()  # one call's models per worker process: memory stays flat
            got = {name: spec.build() for name, spec in shared.specs.items()}
            _worker_predictors[shared.token] = got
        return got


def _one_torch_thread() -> None:
    # Patients already run in parallel, one per worker thread: more OpenMP threads per task would only
    # oversubscribe the worker's cores.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _stored_series(store_url: str, patient_id: str) -> PatientSeries:
    from storage.store import CohortStore

    # A reader: never finish or roll back another process's write from a worker.
    return PatientSeries(CohortStore.open(store_url, recover=False).arrays(patient_id))


def _portable(location: str | os.PathLike) -> str:
    """A store location another process in another working directory resolves the same way: local paths
    made absolute, URLs (``scheme://``) unchanged."""
    text = os.fspath(location)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def score_patient_task(shared: _Shared, store_url: str, patient_id: str,
                       groups: Sequence[tuple[int, int, Sequence[EvalItem]]], cfg: EvalConfig
                       ) -> list[tuple[int, list[dict[str, Any]]]]:
    """One patient's evaluation on a worker: for each (group index, cut, targets) the records of
    ``harness.score_group`` (every predictor in order), tagged with the group index."""
    _one_torch_thread()
    predictors = _predictors_on_worker(shared)
    series = _stored_series(store_url, patient_id)
    return [(gi, score_group(predictors, series, cut, its, cfg)) for gi, cut, its in groups]


def forecast_patient_task(shared: _Shared, store_url: str, patient_id: str, in_days: Sequence[float],
                          n_samples: int, seed: int) -> Prediction:
    """One stored patient's forecast on a worker (``forecast_stored``)."""
    _one_torch_thread()
    (predictor,) = _predictors_on_worker(shared).values()
    return forecast_stored(predictor, _stored_series(store_url, patient_id), in_days, n_samples, seed)


def forecast_stored(predictor: Predictor, series: PatientSeries, in_days: Sequence[float], n_samples: int,
                    seed: int) -> Prediction:
    """``predictor.predict`` at ``in_days`` days after the series' latest scan (the CLI's ``--in``)."""
    last = float(series.days[-1])
    return predictor.predict(series, [last + float(d) for d in in_days], n_samples=n_samples, seed=seed)


def _map_patients(engine: DaskEngine, task: Callable[..., Any], shared: _Shared, patient_ids: Sequence[str],
                  args_of: Callable[[str], tuple[Any, ...]], label: str) -> Iterator[tuple[str, Any]]:
    """Submit ``task(shared, *args_of(pid))`` per patient; yield (patient, result) as patients finish. A task's
    exception is raised here (as the serial path would raise it) and the remaining tasks are cancelled."""
    from distributed import as_completed

    with engine.session() as client:
        shared_f = client.scatter(shared, broadcast=True, hash=False)
        run = uuid.uuid4().hex[:8]
        # pure=False and a per-call key: a rerun computes again (the store or the weights may have changed).
        futures = {client.submit(task, shared_f, *args_of(pid), key=f"{label}-{pid}-{run}", pure=False): pid
                   for pid in patient_ids}
        try:
            for fut in as_completed(list(futures), loop=client.loop):
                yield futures[fut], fut.result()
        finally:
            client.cancel([*futures, shared_f])


def evaluate_items_on_dask(engine: DaskEngine, predictors: Mapping[str, Predictor], store_url: str,
                           items: Sequence[EvalItem], cfg: EvalConfig,
                           progress: Callable[[str], None] | None = None) -> EvaluationReport:
    """``harness.evaluate_items`` with one task per patient on ``engine``: the same records in the same order,
    hence the same rows. ``progress`` gets a line as each patient finishes."""
    groups = group_targets(items)
    plan: dict[str, list[tuple[int, int, list[EvalItem]]]] = {}
    for gi, ((pid, cut), its) in enumerate(groups.items()):
        plan.setdefault(pid, []).append((gi, cut, its))
    shared = _Shared(uuid.uuid4().hex, {name: PredictorSpec.of(p) for name, p in predictors.items()})
    where = _portable(store_url)
    by_group: dict[int, list[dict[str, Any]]] = {}
    targets_done = 0
    for done, (pid, out) in enumerate(_map_patients(engine, score_patient_task, shared, list(plan),
                                                    lambda pid: (where, pid, plan[pid], cfg), "evaluate"), 1):
        by_group.update(out)
        targets_done += sum(len(its) for _gi, _cut, its in plan[pid])
        if progress:
            progress(f"evaluated {done}/{len(plan)} patients ({targets_done}/{len(items)} targets; {pid} done)")
    records = [rec for gi in range(len(groups)) for rec in by_group[gi]]
    names = list(predictors)
    return EvaluationReport(rows=aggregate(records, names, cfg.bins), records=records, models=names,
                            n_targets=len(items), patients=sorted({it.patient_id for it in items}))


def forecast_patients(predictor: Predictor, store_url: str, patient_ids: Sequence[str], in_days: Sequence[float],
                      n_samples: int = 32, seed: int = 0, engine: DaskEngine | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, Prediction]:
    """Batch forecasts of stored patients: each at ``in_days`` days after its latest scan, ``n_samples``
    samples, sampling ``seed`` (as ``longitudinal forecast PATIENT --in D``). On ``engine`` (None: the entered
    engine, else this process) one task per patient; the same Predictions either way.

    Returns {patient: Prediction} in the order of ``patient_ids`` (volumes in ml with intervals, mean image and
    probability maps on the crop; write files with ``longitudinal.predict.output``)."""
    engine = engine if engine is not None else current_engine()
    ids = list(dict.fromkeys(patient_ids))
    if engine is None:
        out = {}
        for i, pid in enumerate(ids, 1):
            out[pid] = forecast_stored(predictor, _stored_series(store_url, pid), in_days, n_samples, seed)
            if progress:
                progress(f"forecast {i}/{len(ids)} patients ({pid} done)")
        return out
    shared = _Shared(uuid.uuid4().hex, {"model": PredictorSpec.of(predictor)})
    where, days = _portable(store_url), [float(d) for d in in_days]
    got: dict[str, Prediction] = {}
    for done, (pid, pred) in enumerate(_map_patients(engine, forecast_patient_task, shared, ids,
                                                     lambda pid: (where, pid, days, n_samples, seed), "forecast"), 1):
        got[pid] = pred
        if progress:
            progress(f"forecast {done}/{len(ids)} patients ({pid} done)")
    return {pid: got[pid] for pid in ids}
