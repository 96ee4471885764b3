"""The demo's parts that decide what a user reads: its training budget (steps, not seconds), the thread count, the
progress it shows from training's and evaluation's lines, and the verdict in plain words."""

from __future__ import annotations

import io

from rich.console import Console

from longitudinal import demo, demo_progress

ROWS = [
    {"model": "lci", "horizon": "all", "n": 58, "dice_whole": 0.48, "volume_error_ml": 25.0},
    {"model": "linear", "horizon": "all", "n": 58, "dice_whole": 0.64, "volume_error_ml": 18.0},
    {"model": "candidate", "horizon": "all", "n": 58, "dice_whole": 0.73, "volume_error_ml": 12.0},
]
PROMOTED = {"gate.decision": "promoted", "gate.val_dice_whole": "0.75", "gate.val_volume_error_ml": "10",
            "gate.lci_dice_whole": "0.5", "gate.lci_volume_error_ml": "20"}
REJECTED = {"gate.decision": "rejected", "gate.val_dice_whole": "0.5", "gate.val_volume_error_ml": "20",
            "gate.lci_dice_whole": "0.5", "gate.lci_volume_error_ml": "20"}
ARGS = {"steps_planned": 200, "safety_stop_s": 3600.0, "test_rows": ROWS, "name": "tgf", "version": "1",
        "train_cmd": "`longitudinal train --steps 600`"}


def test_training_is_budgeted_in_steps_with_a_safety_stop() -> None:
    cfg = demo.demo_train_config()
    assert cfg.steps == demo.DEMO_STEPS and cfg.budget_s == demo.DEMO_MAX_TRAIN_S >= 3600


def test_threads_follow_the_load() -> None:
    assert demo_progress.choose_threads(2, 0.2, {})[0] == 2
    assert demo_progress.choose_threads(2, 4.0, {})[0] == 1
    assert demo_progress.choose_threads(2, 4.0, {"OMP_NUM_THREADS": "2"})[0] == 2
    assert demo_progress.choose_threads(8, 4.0, {"LONGITUDINAL_DEMO_THREADS": "3"}) == (3, "LONGITUDINAL_DEMO_THREADS=3")


def test_verdict_champion() -> None:
    v = demo.verdict(steps_done=200, tags=PROMOTED, champion="1", **ARGS)
    text = "\n".join(v.lines)
    assert v.ok and v.champion
    assert "beat both baselines" in text and "Dice 0.730 vs last scan 0.480 and linear 0.640" in text
    assert "tgf v1 is now the champion" in text


def test_verdict_rejected_says_why_and_what_to_do() -> None:
    v = demo.verdict(steps_done=200, tags=REJECTED, champion=None, **ARGS)
    text = "\n".join(v.lines)
    assert not v.ok and not v.champion
    assert "did NOT become champion" in text and "its Dice 0.500 was not above the last scan's 0.500" in text
    assert "--model tgf/1" in text and "longitudinal train --steps 600" in text


def test_verdict_safety_stop_is_loud() -> None:
    v = demo.verdict(steps_done=37, tags=PROMOTED, champion="1", **ARGS)
    assert not v.ok and "TRAINING WAS CUT SHORT: 37 of 200 steps" in v.lines[0]


def test_reporter_turns_lines_into_progress_in_a_log() -> None:
    out = io.StringIO()
    rep = demo_progress.Reporter(Console(file=out, width=120), steps=20, every_s=0.0)
    for line in ("step 5/20 loss 0.3 lr 1e-4 2.0 samples/s 3 s", "calibrating the volume intervals of best.pt",
                 "evaluated 3/10 targets", "evaluated 10/10 targets", "trained 20 steps in 40 s; checkpoint x",
                 "evaluated 4/8 targets", "evaluated 8/8 targets", "evaluated 2/9 targets",
                 "budget of 3600 s reached at step 20"):
        rep.line(line)
    text = out.getvalue()
    assert "step 5/20" in text and "calibrating the volume intervals of best.pt: 3/10 targets" in text
    assert "scoring on the validation patients" in text and "scoring on the held-out test patients" in text
    assert rep.safety_stop == (3600, 20) and "SAFETY STOP" in text
