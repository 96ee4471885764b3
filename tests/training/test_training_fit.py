"""The fit loop on a phantom store: loss decreases, checkpoint + resume reproduces an uninterrupted run, EMA
weights are what gets saved, baselines 'train' trivially, configs validate at the boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longitudinal.data.dataset import enumerate_targets
from longitudinal.data.phantoms import make_phantom_store
from longitudinal.data.splits import Split
from longitudinal.models.checkpoint import Checkpoint, DataSettings
from longitudinal.training.checkpoint import load_train_state
from longitudinal.training.config import DEFAULT_TRAIN_CONFIG, TrainConfig, load_train_config
from longitudinal.training.fit import fit
from longitudinal.training.logger import JsonlLogger
from longitudinal.training.steps import EMA

TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}


def tiny(**kw) -> TrainConfig:
    # device="cpu": exact resume is a CPU property (CUDA kernels and bf16 autocast are not bitwise repeatable).
    base = dict(model="tfm", model_options=TINY_TFM, crop_size=(16, 16, 16), batch_size=2, num_workers=0, device="cpu",
                warmup_steps=0, lr=3e-3, augment=None, log_every=5, eval_every=1000, ckpt_every=1000,
                val_targets=4, budget_s=None, fov="fixed")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_phantom_store(str(tmp_path_factory.mktemp("fit") / "c.zarr"), n_patients=6, seed=0,
                              grid=(24, 24, 24)).url


def _metrics(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "metrics"]


def test_training_decreases_loss_and_writes_a_run(store, tmp_path):
    run = tmp_path / "run"
    res = fit(tiny(steps=25), store, run, JsonlLogger(run), progress=None)
    losses = [r["metrics"]["train_loss"] for r in _metrics(run) if "train_loss" in r["metrics"]]
    assert len(losses) == 5
    assert losses[-1] < 0.85 * losses[0], losses
    assert res.steps == 25 and res.wall_s > 0
    # Split persisted and disjoint; checkpoints in place; validation against the baselines logged.
    split = Split.load(run / "split.json")
    assert split == res.split and split.check() == []
    assert {"val_lci_dice_whole", "val_linear_dice_whole"} <= set(_metrics(run)[0]["metrics"])
    assert (run / "checkpoints" / "latest.pt").exists() and res.final_checkpoint == run / "model.pt"
    assert res.checkpoint == run / "checkpoints" / "best.pt" and res.best_metric is not None
    ckpt = Checkpoint.load(res.checkpoint)
    model = ckpt.build()
    assert ckpt.kind == "tfm" and ckpt.crop_size == (16, 16, 16) and ckpt.provenance["split_id"] == split.split_id
    assert ckpt.data == DataSettings(max_context=3, normalize="none", fov="fixed")
    assert model.config_dict()["in_channels"] == 2
    # A sampled model leaves training with volume intervals calibrated on the validation patients.
    n_val_targets = len(enumerate_targets(store, split.val, 3, "all"))
    for path in (res.checkpoint, res.final_checkpoint):
        loaded = Checkpoint.load(path)
        cal = loaded.calibration["whole"]
        assert set(loaded.build().volume_calibration) == {"whole", "enhancing"}
        assert cal.n == n_val_targets > 0 and cal.n_patients == len(split.val)
        assert loaded.provenance["volume_calibration_fit"]["step"] == loaded.provenance["step"]
        # The serving choice rests on as many validation targets as the calibration, not on the 4 of the
        # periodic validation.
        evidence = dict(loaded.provenance["serving"]["evidence"])
        strata = evidence.pop("strata")
        assert sum(e["n"] for e in evidence.values()) == n_val_targets > 4
        # ... and each target is in exactly one treatment stratum's evidence.
        assert sum(e["n"] for per_bin in strata.values() for e in per_bin.values()) == n_val_targets


def test_resume_continues_to_the_same_state(store, tmp_path):
    cfg = dict(val_fraction=0.0, test_fraction=0.0)  # no validation: training state only
    straight = fit(tiny(steps=6, ckpt_every=3, **cfg), store, tmp_path / "a", progress=None)
    fit(tiny(steps=3, ckpt_every=3, **cfg), store, tmp_path / "b", progress=None)
    first = load_train_state(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert first["step"] == 3
    resumed = fit(tiny(steps=6, ckpt_every=3, **cfg), store, tmp_path / "b", progress=None)
    assert resumed.steps == straight.steps == 6
    a = load_train_state(tmp_path / "a" / "checkpoints" / "latest.pt")
    b = load_train_state(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert b["step"] == 6 and b["ema"]["updates"] == 6
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b["ema"]["shadow"][key], a["ema"]["shadow"][key], rtol=1e-5, atol=1e-6)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(int(sa[k]["step"]) == int(sb[k]["step"]) == 6 for k in sa)
    # A resume with an incompatible change is refused, naming the field.
    with pytest.raises(ValueError, match="lr"):
        fit(tiny(steps=8, lr=1e-2, **cfg), store, tmp_path / "b", progress=None)


def test_saved_model_holds_the_ema_weights(store, tmp_path):
    fit(tiny(steps=3, ema_decay=0.9, val_fraction=0.0, test_fraction=0.0), store, tmp_path / "r", progress=None)
    state = load_train_state(tmp_path / "r" / "checkpoints" / "latest.pt")
    saved = torch.load(tmp_path / "r" / "model.pt", weights_only=True)["state_dict"]
    key = next(k for k, v in state["model"].items() if v.dtype.is_floating_point and v.numel() > 8)
    torch.testing.assert_close(saved[key], state["ema"]["shadow"][key])
    assert not torch.equal(saved[key], state["model"][key])


def test_ema_follows_its_decay_schedule():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    expected_gap = 1.0
    for n in range(1, 6):
        ema.update(net)
        expected_gap *= min(0.5, (1 + n) / (10 + n))
        assert float(ema.shadow["weight"]) == pytest.approx(1.0 - expected_gap)


def test_baselines_fit_without_training(store, tmp_path):
    res = fit(tiny(model="lci", model_options={}, steps=5), store, tmp_path / "lci", progress=None)
    assert res.steps == 0 and res.checkpoint.exists()
    assert Checkpoint.load(res.checkpoint).build().kind == "lci" and 0 < res.best_metric <= 1


def test_config_validation_reports_every_problem(tmp_path):
    with pytest.raises(ValueError) as exc:
        load_train_config(None, lr=-1, batch_size=0, bogus=1)
    msg = str(exc.value)
    assert "lr" in msg and "batch_size" in msg and "bogus" in msg
    with pytest.raises(ValueError, match="at least one of steps"):
        TrainConfig(budget_s=None, steps=None, epochs=None)
    path = tmp_path / "cfg.yaml"
    path.write_text("model: linear\nsteps: 7\ncrop_size: [24, 24, 24]\n")
    cfg = load_train_config(path, batch_size=3)
    assert (cfg.model, cfg.steps, cfg.crop_size, cfg.batch_size) == ("linear", 7, (24, 24, 24), 3)
    assert cfg.lr == DEFAULT_TRAIN_CONFIG.lr  # unspecified keys keep the tuned defaults
    assert TrainConfig(**cfg.to_dict()) == cfg


def test_a_finished_run_resumed_neither_chooses_nor_calibrates_again(store, tmp_path):
    """A later call on a finished run (as a benchmark's scoring pass makes) keeps the serving choice and the
    calibration; a different serving choice makes the calibration stale."""
    import dataclasses

    from longitudinal.training.validation import calibrate_checkpoint

    run = tmp_path / "run"
    fit(tiny(steps=4), store, run, JsonlLogger(run), progress=None)
    said: list[str] = []
    res = fit(tiny(steps=4), store, run, JsonlLogger(run), progress=said.append, resume=True)
    assert res.steps == 4
    assert not [m for m in said if "served per horizon" in m or "calibrat" in m], said
    ckpt = Checkpoint.load(run / "model.pt")
    sources = ckpt.provenance["serving"]["sources"]
    flipped = ["lci" if s != "lci" else "model" for s in sources]
    dataclasses.replace(ckpt, provenance={**ckpt.provenance, "serving": {**ckpt.provenance["serving"],
                                                                         "sources": flipped}}).save(run / "model.pt")
    said.clear()
    calibrate_checkpoint(run / "model.pt", store, list(res.split.val), tiny(steps=4), torch.device("cpu"),
                         said.append)
    assert any("calibrating the volume intervals" in m for m in said), said
    assert Checkpoint.load(run / "model.pt").provenance["volume_calibration_fit"]["serving"]["all"] == flipped
