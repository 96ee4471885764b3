"""Data-parallel training under torchrun (2 CPU processes, gloo): both ranks step in lockstep, only rank 0
writes, and the run resumes like a single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from longitudinal.data.dataset import StreamSampler
from longitudinal.data.phantoms import make_phantom_store
from longitudinal.training.checkpoint import load_train_state

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.fit import fit
    from longitudinal.training.logger import JsonlLogger
    store, run, steps, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    cfg = TrainConfig(model="tfm", model_options={"width": 4, "channel_mult": [1, 2], "ctx_width": 4,
                      "emb_dim": 16, "steps": 2}, crop_size=(16, 16, 16), batch_size=2, num_workers=0,
                      device="cpu", augment=None, warmup_steps=0, steps=steps, log_every=2, eval_every=1000,
                      ckpt_every=1000, val_targets=2, budget_s=None)
    res = fit(cfg, store, run, JsonlLogger(run), progress=None)
    # One file per rank: torchrun merges the ranks' stdout, and two lines written at once can interleave.
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"steps": res.steps, "best": res.best_metric}))
''')


def test_stream_sampler_shards_batches_across_ranks():
    full = iter(StreamSampler(7, seed=1))
    stream = [next(full) for _ in range(24)]
    shards = []
    for rank in range(2):
        it = iter(StreamSampler(7, seed=1, rank=rank, world=2, batch_size=3))
        shards.append([next(it) for _ in range(12)])
    # Batches of 3 alternate between the ranks: rank 0 gets batches 0, 2, 4, 6; rank 1 gets 1, 3, 5, 7.
    assert shards[0] == [x for b in range(0, 8, 2) for x in stream[3 * b:3 * b + 3]]
    assert shards[1] == [x for b in range(1, 8, 2) for x in stream[3 * b:3 * b + 3]]


def test_two_process_training_under_torchrun(tmp_path):
    store = make_phantom_store(str(tmp_path / "c.zarr"), n_patients=5, seed=4, grid=(24, 24, 24)).url
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}

    def launch(steps: int) -> list[dict]:
        out = tmp_path / f"results-{steps}"
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(script), store, str(run), str(steps), str(out)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]

    results = launch(4)
    assert len(results) == 2 and all(r["steps"] == 4 for r in results)
    assert sum(r["best"] is not None for r in results) == 1, "only rank 0 validates"
    state = load_train_state(run / "checkpoints" / "latest.pt")
    assert state["step"] == 4
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in metrics if r["kind"] == "metrics" and "train_loss" in r["metrics"]]
    assert steps == [2, 4], "one logger line per interval (rank 0 only)"
    # Resume to 6 global steps.
    results = launch(6)
    assert all(r["steps"] == 6 for r in results)
    resumed = load_train_state(run / "checkpoints" / "latest.pt")
    assert resumed["step"] == 6 and resumed["ema"]["updates"] == 6
    assert any(not torch.equal(resumed["model"][k], state["model"][k]) for k in state["model"])
