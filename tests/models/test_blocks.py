"""Shared blocks: a U-Net's cached conditioning stem computes exactly what one stem over the concatenation does."""

from __future__ import annotations

import pytest
import torch

from longitudinal.models.blocks import FiLMUNet3d


def test_cached_conditioning_equals_one_stem_over_the_concatenation():
    torch.manual_seed(0)
    split = FiLMUNet3d(3, 2, 4, (1, 2), 8, cond_channels=5).eval()
    whole = FiLMUNet3d(8, 2, 4, (1, 2), 8).eval()
    state = {k: v for k, v in split.state_dict().items() if not k.startswith(("stem.", "cond_stem."))}
    state["stem.weight"] = torch.cat([split.stem.weight, split.cond_stem.weight], dim=1)
    state["stem.bias"] = split.stem.bias
    whole.load_state_dict(state)
    x, cond, emb = torch.randn(2, 3, 7, 8, 6), torch.randn(2, 5, 7, 8, 6), torch.randn(2, 8)  # odd size: padded
    with torch.no_grad():
        cached = split(x, emb, split.condition(cond))
        reference = whole(torch.cat([x, cond], dim=1), emb)
    assert cached.shape == (2, 2, 7, 8, 6)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("skip_mode,out_kernel", [("concat", 3), ("add", 3), ("add", 1), ("concat", 1)])
@pytest.mark.parametrize("size", [(8, 8, 8), (7, 9, 6)])
def test_unet_shapes_and_gradients_for_every_skip_mode(skip_mode, out_kernel, size):
    torch.manual_seed(0)
    net = FiLMUNet3d(3, 4, 4, (1, 2, 4), 8, cond_channels=2, skip_mode=skip_mode, out_kernel=out_kernel)
    x, cond, emb = torch.randn(2, 3, *size), torch.randn(2, 2, *size), torch.randn(2, 8)
    out = net(x, emb, net.condition(cond))
    assert out.shape == (2, 4, *size)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_bad_skip_mode_is_refused():
    with pytest.raises(ValueError, match="skip_mode"):
        FiLMUNet3d(3, 4, 4, (1, 2), 8, skip_mode="sum")
