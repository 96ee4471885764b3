"""The typed checkpoint round-trips through bytes and files, rebuilding models that forecast identically, and
refuses malformed files with every problem named."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from longitudinal.models.base import build_model
from longitudinal.models.calibration import VolumeCalibration
from longitudinal.models.checkpoint import Checkpoint, DataSettings


@pytest.mark.parametrize("kind,config", [("tfm", {"width": 4, "channel_mult": [1, 2], "ctx_width": 4}),
                                         ("linear", {})])
@pytest.mark.parametrize("to_file", [False, True])
def test_round_trip(kind, config, to_file, tmp_path):
    torch.manual_seed(0)
    model = build_model(kind, config, in_channels=2)
    ckpt = Checkpoint.of_model(model, ["T1c", "FLAIR"], (2.0, 2.0, 2.0), (16, 16, 16),
                               DataSettings(max_context=2, normalize="context_mean"), provenance={"step": 3})
    dest = tmp_path / "model.pt" if to_file else io.BytesIO()
    ckpt.save(dest)
    if not to_file:
        dest.seek(0)
    back = Checkpoint.load(dest)
    assert back.channels == ("T1c", "FLAIR") and back.crop_size == (16, 16, 16) and back.provenance == {"step": 3}
    assert back.data == DataSettings(max_context=2, normalize="context_mean") and back.kind == kind
    again = back.build()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 2, 8, 8, 8, generator=g)
    lab = torch.randint(0, 3, (1, 2, 8, 8, 8), generator=g)
    args = (x, lab, torch.tensor([[0.0, 90.0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[200.0]]))
    a = model.eval().sample(*args, n_samples=2, generator=torch.Generator().manual_seed(1))
    b = again.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and torch.equal(a.probs, b.probs)


def test_calibration_round_trips_and_reaches_the_model(tmp_path):
    gaps = np.linspace(30, 600, 30)
    cal = VolumeCalibration.fit("whole", np.full(30, 55.0), np.full(30, 50.0), gaps)
    ckpt = Checkpoint.of_model(build_model("linear"), ["T1c"], [2.0] * 3, [8] * 3).with_calibration(
        {"whole": cal}, fitted_on="val")
    ckpt.save(tmp_path / "c.pt")
    back = Checkpoint.load(tmp_path / "c.pt")
    assert set(back.calibration) == {"whole"} and back.provenance["fitted_on"] == "val"
    assert back.calibration["whole"].quantiles(50.0, 100.0) == cal.quantiles(50.0, 100.0)
    assert set(back.build().volume_calibration) == {"whole"}
    assert "state_dict" not in back.describe() and back.describe()["meta"]["data"]["max_context"] == 3


def test_missing_and_malformed_fields_are_named(tmp_path):
    buf = io.BytesIO()
    torch.save({"kind": "lci", "config": {}}, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match=r"missing keys \['state_dict', 'channels', 'spacing_mm', 'crop_size'"):
        Checkpoint.load(buf)
    bad = Checkpoint.of_model(build_model("lci"), ["T1c"], [2.0] * 3, [8] * 3).to_dict()
    bad["meta"]["data"] = {"max_context": 0, "normalize": "zscore"}
    bad["crop_size"] = [8, 8]
    with pytest.raises(ValueError) as info:
        Checkpoint.from_dict(bad, "x.pt")
    msg = str(info.value)
    assert "x.pt" in msg and "max_context" in msg and "zscore" in msg and "crop_size" in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt cannot be read"):
        Checkpoint.load(tmp_path / "junk.pt")


def test_a_tfm_checkpoint_of_the_earlier_layout_loads_and_forecasts_the_same():
    """Before the rate head, tfm checkpoints had no rate_head/skip_mode/out_kernel keys and one stem over
    [x_t, conditioning]; they must keep loading (registered models) and forecast exactly as before."""
    torch.manual_seed(0)
    old_cfg = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "in_channels": 1,
               "rate_head": False, "skip_mode": "concat", "out_kernel": 3}
    reference = build_model("tfm", old_cfg).eval()
    legacy = Checkpoint.of_model(reference, ["T1c"], [2.0] * 3, [8] * 3).to_dict()
    for key in ("rate_head", "skip_mode", "out_kernel"):
        del legacy["config"][key]
    sd = legacy["state_dict"]
    sd["net.stem.weight"] = torch.cat([sd["net.stem.weight"], sd.pop("net.cond_stem.weight")], dim=1)
    loaded = Checkpoint.from_dict(legacy).build()
    assert loaded.config.rate_head is False and loaded.config.skip_mode == "concat"
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (1, 2, 8, 8, 8), generator=g)
    args = (torch.randn(1, 2, 1, 8, 8, 8, generator=g), labels, torch.tensor([[0.0, 90.0]]),
            torch.ones(1, 2, dtype=torch.bool), torch.tensor([[200.0]]))
    a = reference.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(2))
    b = loaded.sample(*args, n_samples=2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.images, b.images)
