"""Tracked data-parallel training: ``torchrun --nproc_per_node 2 -m longitudinal train --track`` with gloo on
CPU, launched as the train-forecaster flow launches it, on a fresh sqlite database. One MLflow run, one
registered version, a gate decision, nothing logged twice; the other rank never opens the tracking store; a
killed launch resumes in the same run; a rerun of the finished training is a no-op on every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from trackinghelpers import ENV_QUIET, TINY_TRAIN

from longitudinal.commands.train import torchrun_train_command, train_with_torchrun
from longitudinal.data.phantoms import make_phantom_store
from longitudinal.settings import Settings
from longitudinal.tracking import uri
from longitudinal.tracking.registry import alias_version, list_versions
from longitudinal.tracking.run import STATE_FILE, config_dict, run_key, run_training, store_hash
from longitudinal.training.config import DEFAULT_TRAIN_CONFIG, TrainConfig

NAME = "tumor-growth-forecaster"
TFM = {**TINY_TRAIN, "model": "tfm", "steps": 4, "eval_every": 2, "ckpt_every": 2, "val_targets": 2,
       "calib_targets": 6, "calib_samples": 2,
       "model_options": {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}}


def _env(cwd: Path) -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, **ENV_QUIET, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}


def _assert_logged_once(client: MlflowClient, run_id: str) -> None:
    """Every metric of the run has each step once (rank 1 logging too would double fit's metrics)."""
    run = client.get_run(run_id)
    for key in run.data.metrics:
        steps = Counter(m.step for m in client.get_metric_history(run_id, key))
        twice = [s for s, n in steps.items() if n > 1]
        assert not twice, f"{key} logged more than once at steps {twice}"


def _assert_schema_current(settings: Settings) -> None:
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version
    from sqlalchemy import create_engine

    engine = create_engine(settings.tracking_uri)
    try:
        assert _get_schema_version(engine) == _get_latest_schema_revision()
    finally:
        engine.dispose()


@pytest.fixture
def cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = str(tmp_path / "store.zarr")
    make_phantom_store(store, n_patients=6, seed=2, grid=(24, 24, 24))
    return {"settings": Settings(home=tmp_path / "home"), "store": store, "cwd": cwd, "root": tmp_path}


def test_torchrun_tracked_training_one_run_one_version_gated(cohort: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings, store = cohort["settings"], cohort["store"]
    for k, v in _env(cohort["cwd"]).items():
        monkeypatch.setenv(k, v)
    summary = train_with_torchrun(settings, store, TFM, 2, eval_samples=2, timeout_s=600)

    assert summary["version"] == "1" and summary["created_version"] and not summary["resumed"]
    decision = summary["decision"]["gate.decision"]
    assert decision in ("promoted", "rejected")
    client = uri.client(settings)
    champion = alias_version(client, NAME, "champion")
    # The gate decided the champion: v1 when it beat LCI, none otherwise (no earlier champion here).
    assert (champion is not None and str(champion.version) == "1") == (decision == "promoted")
    assert summary["aliases"] == (["challenger", "champion"] if decision == "promoted" else ["challenger"])
    assert [v.version for v in list_versions(settings)] == ["1"]
    assert list_versions(settings)[0].intervals.startswith("calibrated: ")  # rank 0 calibrated tfm

    exp = client.get_experiment_by_name(uri.EXPERIMENT_NAME)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]], "one MLflow run for the two ranks"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["distributed.world_size"] == "2"
    assert run.data.tags["registry.version"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [1, 2, 3, 4], "one train_loss per global step, from rank 0 only"
    _assert_logged_once(client, run.info.run_id)
    _assert_schema_current(settings)
    # The run folder is keyed by the world size too: a 2-process step is another training than a 1-process one.
    cfg = TrainConfig(**{**DEFAULT_TRAIN_CONFIG.to_dict(), **TFM})
    assert Path(summary["run_dir"]).name == f"tfm-{run_key(config_dict(cfg), store_hash(store), 2)}"

    # A rerun of the finished training: rank 0 finds it done, rank 1 trains nothing, both exit 0.
    again = train_with_torchrun(settings, store, TFM, 2, eval_samples=2, timeout_s=600)
    assert again["run_id"] == summary["run_id"] and again["resumed"] and not again["created_version"]
    assert [v.version for v in list_versions(settings)] == ["1"]
    assert list(cohort["cwd"].iterdir()) == []


def test_killed_torchrun_training_resumes_in_the_same_run(cohort: dict[str, Any]) -> None:
    settings, store, root = cohort["settings"], cohort["store"], cohort["root"]
    cfg = {**TFM, "steps": 6, "eval_every": 1000}
    (root / "cfg.json").write_text(json.dumps(cfg))
    summary_path = root / "summary.json"
    env = {**_env(cohort["cwd"]), "LONGITUDINAL_HOME": str(settings.home_dir)}
    cmd = torchrun_train_command(2, store, root / "cfg.json", summary_path, eval_samples=2)
    full = TrainConfig(**{**DEFAULT_TRAIN_CONFIG.to_dict(), **cfg})
    run_dir = settings.runs_path / f"tfm-{run_key(config_dict(full), store_hash(store), 2)}"
    latest = run_dir / "checkpoints" / "latest.pt"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, killed_at = time.monotonic() + 400, None
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists():
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
            proc.wait(timeout=30)
            killed_at = int(torch.load(latest, weights_only=True)["step"])
            break
        time.sleep(0.05)
    assert killed_at is not None, f"no checkpoint before the launch ended: {proc.stderr.read()[-3000:]}"
    assert 0 < killed_at < cfg["steps"]
    first_run_id = json.loads((run_dir / STATE_FILE).read_text())["run_id"]
    assert list_versions(settings) == []

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["resumed"] and summary["run_id"] == first_run_id
    assert [v.version for v in list_versions(settings)] == ["1"]
    client = MlflowClient(summary["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(first_run_id, "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == cfg["steps"] and min(steps) <= killed_at
    assert torch.load(latest, weights_only=True)["step"] == cfg["steps"]
    assert client.get_run(first_run_id).info.status == "FINISHED"


def test_other_ranks_never_touch_the_tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a tracked launch: the run folder comes from rank 0, it trains there and waits; any MLflow
    or tracking-URI call would fail this test (in-process, the collectives replaced by their outcome)."""
    import longitudinal.tracking.run as run_mod
    import longitudinal.training.fit as fit_mod
    import longitudinal.training.steps as steps_mod

    calls: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(steps_mod, "init_distributed", lambda ctx, device="auto": calls.append("init") or True)
    monkeypatch.setattr(steps_mod, "leave_distributed", lambda: calls.append("leave"))
    monkeypatch.setattr(steps_mod, "broadcast_from_main",
                        lambda obj, ctx: calls.append("broadcast") or {"run_dir": str(tmp_path / "run"),
                                                                       "train": True})
    monkeypatch.setattr(steps_mod, "wait_for_all", lambda ctx: calls.append("wait"))
    monkeypatch.setattr(fit_mod, "fit", lambda cfg, store, run_dir, logger, resume=True, progress=None:
                        calls.append(f"fit {Path(run_dir).name} logger={logger}"))

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("a non-zero rank touched MLflow")

    for name in ("configure", "client", "ensure_experiment"):
        monkeypatch.setattr(run_mod.uri_mod, name, forbidden)
    monkeypatch.setattr(run_mod, "store_hash", forbidden)
    monkeypatch.setattr(run_mod.mlflow, "start_run", forbidden)
    monkeypatch.setattr(run_mod, "MlflowLogger", forbidden)

    out = run_training(Settings(home=tmp_path / "home"), str(tmp_path / "none.zarr"),
                       {**TINY_TRAIN, "model": "tfm"})
    assert out is None
    assert calls == ["init", "broadcast", "fit run logger=None", "wait", "leave"]
    assert not (tmp_path / "home").exists(), "no workspace file (mlflow.db) created by rank 1"


def test_flow_task_launches_torchrun_for_several_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train-forecaster's task: nproc_per_node > 1 goes through torchrun (the launcher tested above), "auto" on
    a machine without GPUs and 1 train in the task's process."""
    import longitudinal.commands.train as cmd_mod
    import longitudinal.tracking.run as run_mod
    from flows.train import processes_per_node, train_task

    launched: list[tuple] = []
    monkeypatch.setattr(cmd_mod, "train_with_torchrun", lambda settings, store, cfg, n, **kw:
                        launched.append(("torchrun", n, kw["flow_run_id"])) or {"run_id": "r"})

    class Outcome:
        def summary(self) -> dict:
            return {"run_id": "in-process"}

    monkeypatch.setattr(run_mod, "run_training", lambda *a, **kw: launched.append(("in-process",)) or Outcome())
    home = str(tmp_path / "home")
    assert train_task.fn("s.zarr", TINY_TRAIN, None, "flow-1", home, nproc_per_node=2) == {"run_id": "r"}
    assert train_task.fn("s.zarr", TINY_TRAIN, None, "flow-1", home, nproc_per_node="auto") == \
        {"run_id": "in-process"}
    assert launched == [("torchrun", 2, "flow-1"), ("in-process",)]
    assert processes_per_node("auto") == max(1, torch.cuda.device_count()) and processes_per_node("3") == 3
    with pytest.raises(ValueError):
        processes_per_node(0)
    argv = torchrun_train_command(4, "s3://b/c.zarr", Path("cfg.json"), Path("out.json"), "name", "flow-1", 2)
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert argv[6:10] == ["-m", "longitudinal", "train", "--track"]
    assert ["--register-as", "name"] == argv[argv.index("--register-as"):argv.index("--register-as") + 2]
