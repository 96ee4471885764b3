"""Checkpoint dicts round-trip through bytes and files, rebuilding models that forecast identically."""

from __future__ import annotations

import io

import pytest
import torch

from longitudinal.models.base import build_model
from longitudinal.models.checkpoint import (
    checkpoint_dict,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize("kind,config", [("tfm", {"width": 4, "channel_mult": [1, 2], "ctx_width": 4}),
                                         ("linear", {})])
@pytest.mark.parametrize("to_file", [False, True])
def test_round_trip(kind, config, to_file, tmp_path):
    torch.manual_seed(0)
    model = build_model(kind, config, in_channels=2)
    ckpt = checkpoint_dict(model, ["T1c", "FLAIR"], (2.0, 2.0, 2.0), (16, 16, 16), meta={"step": 3})
    dest = tmp_path / "model.pt" if to_file else io.BytesIO()
    save_checkpoint(ckpt, dest)
    if not to_file:
        dest.seek(0)
    back = load_checkpoint(dest)
    assert back["channels"] == ["T1c", "FLAIR"] and back["crop_size"] == [16, 16, 16] and back["meta"] == {"step": 3}
    again = model_from_checkpoint(back)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 2, 8, 8, 8, generator=g)
    lab = torch.randint(0, 3, (1, 2, 8, 8, 8), generator=g)
    args = (x, lab, torch.tensor([[0.0, 90.0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[200.0]]))
    a = model.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(1))
    b = again.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and torch.equal(a.probs, b.probs)


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match="state_dict"):
        save_checkpoint({"kind": "lci"}, io.BytesIO())
    buf = io.BytesIO()
    torch.save({"kind": "lci", "config": {}}, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="crop_size"):
        load_checkpoint(buf)


def test_a_tfm_checkpoint_of_the_earlier_layout_loads_and_forecasts_the_same():
    """Before the rate head, tfm checkpoints had no rate_head/skip_mode/out_kernel keys and one stem over
    [x_t, conditioning]; they must keep loading (registered models) and forecast exactly as before."""
    import torch

    from longitudinal.models.base import build_model
    from longitudinal.models.checkpoint import checkpoint_dict, model_from_checkpoint

    torch.manual_seed(0)
    old_cfg = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "in_channels": 1,
               "rate_head": False, "skip_mode": "concat", "out_kernel": 3}
    reference = build_model("tfm", old_cfg).eval()
    legacy = checkpoint_dict(reference, ["T1c"], [2.0] * 3, [8] * 3)
    for key in ("rate_head", "skip_mode", "out_kernel"):
        del legacy["config"][key]
    sd = legacy["state_dict"]
    sd["net.stem.weight"] = torch.cat([sd["net.stem.weight"], sd.pop("net.cond_stem.weight")], dim=1)
    loaded = model_from_checkpoint(legacy).eval()
    assert loaded.config.rate_head is False and loaded.config.skip_mode == "concat"
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (1, 2, 8, 8, 8), generator=g)
    args = (torch.randn(1, 2, 1, 8, 8, 8, generator=g), labels, torch.tensor([[0.0, 90.0]]),
            torch.ones(1, 2, dtype=torch.bool), torch.tensor([[200.0]]))
    a = reference.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(2))
    b = loaded.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.images, b.images)
