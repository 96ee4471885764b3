"""The promotion gate (known answers) and the registry on both backends: challenger always, champion only when
the candidate beats LCI and the champion; registration is idempotent per run; every model reference form
resolves to the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trackinghelpers import baseline_checkpoint

from longitudinal.settings import Settings
from longitudinal.tracking import uri
from longitudinal.tracking.logged_model import log_forecaster
from longitudinal.tracking.registry import (
    GateMetrics,
    alias_version,
    apply_decision,
    gate,
    list_versions,
    register_version,
    resolve_model_ref,
)

LCI = GateMetrics(dice_whole=0.70, volume_error_ml=3.0, n=10)


@pytest.mark.parametrize(
    ("candidate", "champion", "promote", "n_reasons"),
    [
        (GateMetrics(0.80, 2.0, 10), None, True, 0),  # beats LCI, no champion yet
        (GateMetrics(0.70, 2.0, 10), None, False, 1),  # ties LCI on Dice: not strictly better
        (GateMetrics(0.80, 3.5, 10), None, False, 1),  # better Dice, worse volume error
        (GateMetrics(0.60, 4.0, 10), None, False, 2),  # worse on both
        (GateMetrics(0.80, 2.0, 10), GateMetrics(0.85, 1.5, 10), False, 2),  # beats LCI, not the champion
        (GateMetrics(0.90, 1.0, 10), GateMetrics(0.85, 1.5, 10), True, 0),  # beats both
    ],
)
def test_gate_known_answers(candidate: GateMetrics, champion: GateMetrics | None, promote: bool,
                            n_reasons: int) -> None:
    d = gate(candidate, LCI, champion, "3" if champion else None)
    assert d.promote is promote
    assert len(d.reasons) == n_reasons
    assert d.tags()["gate.decision"] == ("promoted" if promote else "rejected")


def test_gate_metrics_pool_rows() -> None:
    rows = [
        {"model": "m", "horizon": "0-90", "n": 3, "dice_whole": 0.9, "volume_error_ml": 1.0},
        {"model": "m", "horizon": "90-180", "n": 1, "dice_whole": 0.5, "volume_error_ml": 5.0},
        {"model": "lci", "horizon": "0-90", "n": 3, "dice_whole": 0.1, "volume_error_ml": 9.0},
    ]
    g = GateMetrics.from_rows(rows, "m")
    assert (g.dice_whole, g.volume_error_ml, g.n) == (pytest.approx(0.8), pytest.approx(2.0), 4)
    pooled = [*rows, {"model": "m", "horizon": "all", "n": 4, "dice_whole": 0.77, "volume_error_ml": 2.2}]
    assert GateMetrics.from_rows(pooled, "m").dice_whole == pytest.approx(0.77)
    with pytest.raises(ValueError, match="no validation figures"):
        GateMetrics.from_rows(rows, "absent")


def test_registry_challenger_champion_and_refs(backend_settings: Settings, tmp_path: Path,
                                               empty_cwd: Path) -> None:
    s = backend_settings
    name = "tumor-growth-forecaster"
    client = uri.client(s)
    exp = uri.ensure_experiment(s)
    ckpt = baseline_checkpoint(tmp_path / "linear.pt", "linear")
    runs = [client.create_run(exp).info.run_id for _ in range(3)]
    model_uri = log_forecaster(ckpt, runs[0], s.tracking_uri)
    assert model_uri.startswith("models:/m-")
    assert log_forecaster(ckpt, runs[0], s.tracking_uri) == model_uri  # logged once per run
    model_id = model_uri.removeprefix("models:/")

    figures = [GateMetrics(0.80, 2.0, 10), GateMetrics(0.75, 2.5, 10), GateMetrics(0.85, 1.5, 10)]
    expect_champion = ["1", "1", "3"]
    for i, (run_id, cand) in enumerate(zip(runs, figures, strict=True)):
        mv, created = register_version(client, name, model_uri, run_id, model_id, {"model_kind": "linear"})
        again, created_again = register_version(client, name, model_uri, run_id, model_id, {})
        assert created and not created_again and str(again.version) == str(mv.version) == str(i + 1)
        champ = alias_version(client, name, "champion")
        champ_metrics = None if champ is None else GateMetrics(
            float(champ.tags["gate.val_dice_whole"]), float(champ.tags["gate.val_volume_error_ml"]), 10)
        decision = gate(cand, LCI, champ_metrics, None if champ is None else str(champ.version))
        aliases = apply_decision(client, name, mv.version, decision)
        assert "challenger" in aliases
        assert str(alias_version(client, name, "champion").version) == expect_champion[i]
        assert str(alias_version(client, name, "challenger").version) == str(mv.version)

    weak = client.get_model_version(name, "2")
    assert weak.tags["gate.decision"] == "rejected"
    assert "champion" in weak.tags["gate.reasons"] and weak.tags["gate.champion_version"] == "1"
    rows = list_versions(s)
    assert [r.version for r in rows] == ["3", "2", "1"]
    assert rows[0].aliases == ["challenger", "champion"] and rows[0].kind == "linear"
    assert rows[1].decision == "rejected" and rows[1].val_dice_whole == "0.7500"

    want = torch.load(ckpt, weights_only=True)["state_dict"]
    for ref in (f"{name}@champion", f"{name}/2", f"models:/{name}@challenger", f"models:/{name}/1", model_uri,
                f"runs:/{runs[0]}", f"runs:/{runs[0]}/forecaster", str(ckpt)):
        resolved = resolve_model_ref(ref, s)
        got = torch.load(resolved.checkpoint, weights_only=True)
        assert got["kind"] == "linear", ref
        assert got["state_dict"].keys() == want.keys(), ref
    assert resolve_model_ref(f"{name}@champion", s).metadata["version"] == "3"
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        resolve_model_ref("not a ref", s)
    with pytest.raises(ValueError, match="no such registered model version"):
        resolve_model_ref(f"{name}/99", s)
    assert list(empty_cwd.iterdir()) == []


def test_evaluate_accepts_registry_references(tmp_path: Path, empty_cwd: Path) -> None:
    """`evaluate --model NAME@ALIAS` scores the registered checkpoint exactly like its local file."""
    from longitudinal.data.phantoms import make_phantom_store
    from longitudinal.tracking.run import evaluate_model_ref

    s = Settings(home=tmp_path / "home")
    store = str(tmp_path / "store.zarr")
    make_phantom_store(store, n_patients=2, seed=5, grid=(24, 24, 24))
    client = uri.client(s)
    run_id = client.create_run(uri.ensure_experiment(s)).info.run_id
    ckpt = baseline_checkpoint(tmp_path / "linear.pt", "linear", crop=16)
    model_uri = log_forecaster(ckpt, run_id, s.tracking_uri)
    mv, _ = register_version(client, "tgf", model_uri, run_id, None, {"model_kind": "linear"})
    client.set_registered_model_alias("tgf", "champion", str(mv.version))
    by_alias = evaluate_model_ref("tgf@champion", s, store).rows
    by_file = evaluate_model_ref(str(ckpt), s, store).rows
    assert [r["model"] for r in by_alias] == [r["model"] for r in by_file]
    assert [r["dice_whole"] for r in by_alias] == pytest.approx([r["dice_whole"] for r in by_file], nan_ok=True)
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        evaluate_model_ref("no-such-thing", s, store)
