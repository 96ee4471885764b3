"""run_training end to end on the sqlite default: the gate holds (a weak challenger is not promoted, a better
one is), a rerun reuses the run and registers nothing new, the run carries params / per-epoch and system
metrics / evaluation tables / figures / tags, and a fresh process consumes the champion from native NIfTI."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from trackinghelpers import TINY_TRAIN, check_consumer_output, run_consumer, write_native_series

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.settings import Settings
from longitudinal.tracking import uri
from longitudinal.tracking.registry import alias_version, list_versions
from longitudinal.tracking.run import TrainOutcome, run_training

NAME = "tumor-growth-forecaster"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """linear (beats LCI) -> lci (weak: ties LCI) -> linear again (a rerun), on one tiny phantom store,
    from an empty working directory with no MLFLOW_TRACKING_URI."""
    import os

    root = tmp_path_factory.mktemp("e2e")
    cwd = root / "cwd"
    cwd.mkdir()
    old_cwd, old_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(cwd)
    try:
        settings = Settings(home=root / "home")
        store = str(root / "store.zarr")
        make_phantom_store(store, n_patients=8, seed=1, grid=(24, 24, 24))
        out = {"settings": settings, "store": store, "cwd": cwd, "root": root}
        out["linear"] = run_training(settings, store, {**TINY_TRAIN, "model": "linear"})
        out["lci"] = run_training(settings, store, {**TINY_TRAIN, "model": "lci"})
        out["linear_again"] = run_training(settings, store, {**TINY_TRAIN, "model": "linear"})
        return out
    finally:
        os.chdir(old_cwd)
        if old_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def test_gate_promotes_the_better_and_rejects_the_weak(trained: dict) -> None:
    better: TrainOutcome = trained["linear"]
    weak: TrainOutcome = trained["lci"]
    assert better.decision is not None and better.decision.promote
    assert better.aliases == ["challenger", "champion"]
    assert weak.decision is not None and not weak.decision.promote
    assert weak.aliases == ["challenger"]
    assert weak.decision.champion_version == better.version
    # the weak candidate IS lci: same figures as LCI, so "strictly better" fails on both
    assert weak.decision.candidate.dice_whole == pytest.approx(weak.decision.lci.dice_whole)
    client = uri.client(trained["settings"])
    assert str(alias_version(client, NAME, "champion").version) == better.version
    assert str(alias_version(client, NAME, "challenger").version) == weak.version
    tags = client.get_model_version(NAME, weak.version).tags
    assert tags["gate.decision"] == "rejected" and "lci" in tags["gate.reasons"]


def test_rerun_reuses_the_run_and_registers_nothing_new(trained: dict) -> None:
    first, again = trained["linear"], trained["linear_again"]
    assert again.resumed and not first.resumed
    assert again.run_id == first.run_id and again.run_dir == first.run_dir
    assert not again.created_version and again.version == first.version
    assert again.decision is None  # gated once, never twice
    assert [r.version for r in list_versions(trained["settings"])] == ["2", "1"]


def test_the_run_records_params_metrics_tables_figures_and_tags(trained: dict) -> None:
    out: TrainOutcome = trained["linear"]
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "linear" and run.data.params["crop_size"] == "[16, 16, 16]"
    metrics = run.data.metrics
    assert any(k.startswith("system/cpu_utilization_percentage") for k in metrics), sorted(metrics)[:20]
    assert any(k.startswith("val_") for k in metrics)  # from fit's per-evaluation logging
    assert "test/candidate/all/dice_whole" in metrics and "val/lci/all/dice_whole" in metrics
    tags = run.data.tags
    for key in ("store_hash", "split_id", "code_version", "model_kind", "registry.version"):
        assert tags.get(key), key
    version = MlflowClient(out.tracking_uri).get_model_version(NAME, out.version)
    assert version.tags["intervals"] == "point forecast"  # linear is deterministic
    assert "figures.error" not in tags, tags.get("figures.error")
    paths = {a.path for d in ("", "evaluation", "figures") for a in client.list_artifacts(out.run_id, d or None)}
    assert {"evaluation/test.csv", "evaluation/validation.json", "split.json", "config.json",
            "figures/skill_vs_lci.png", "figures/forecast_montage.png",
            "figures/volume_trajectories.png"} <= paths, paths


def test_fresh_process_consumes_the_champion_from_native_nifti(trained: dict) -> None:
    frame, truth = write_native_series(trained["root"] / "native")
    rows = run_consumer(trained["settings"].tracking_uri, frame, trained["root"] / "consumer")
    check_consumer_output(rows, truth)


def test_nothing_written_in_the_working_directory(trained: dict) -> None:
    assert list(Path(trained["cwd"]).iterdir()) == []


def test_server_backend_end_to_end(mlflow_server: object, tmp_path: Path, empty_cwd: Path) -> None:
    """The same path against a real `mlflow server` on loopback: train, register, promote, consume. (Its own
    registered name: the session's server also holds the registry test's versions.)"""
    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server.uri)  # type: ignore[attr-defined]
    store = str(tmp_path / "store.zarr")
    make_phantom_store(store, n_patients=6, seed=3, grid=(24, 24, 24))
    name = "tumor-growth-forecaster-server-e2e"
    out = run_training(settings, store, {**TINY_TRAIN, "model": "linear"}, register_as=name)
    assert out.tracking_uri.startswith("http://127.0.0.1:")
    assert out.created_version and "champion" in out.aliases
    artifact_uri = MlflowClient(out.tracking_uri).get_run(out.run_id).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:")  # the server owns the artifact store
    frame, truth = write_native_series(tmp_path / "native")
    rows = run_consumer(out.tracking_uri, frame, tmp_path / "consumer", name)
    check_consumer_output(rows, truth)
    assert list(empty_cwd.iterdir()) == []
