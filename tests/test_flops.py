"""minisora.flops against torch's FlopCounterMode on tiny models, and the per-frame part counted per frame.

FlopCounterMode counts matmuls exactly but attention as dense (every query against every key), and this
torch's CPU SDPA kernel not at all, so attention runs here through a plain matmul version of SDPA: with
full attention the whole forward matches; under a mask the matmuls match and the visible pairs are those
of the mask minisora.attention builds.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minisora import attention
from minisora.flops import train_step_flops, visible_pairs
from minisora.model import VideoDiT, count_params

B, T, H, W = 2, 3, 8, 8  # 16 tokens per frame at patch 2


def matmul_sdpa(q, k, v, attn_mask=None):
    """SDPA as two matmuls and a softmax, which FlopCounterMode counts (dense)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def counted_forward(mode, monkeypatch, context_only=0):
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", matmul_sdpa)
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, num_actions=3,
                     attention="full" if mode == "full" else "causal")
    x, t = torch.randn(B, T, 4, H, W), torch.rand(B, T)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # noisy frames: those after context_only
        model(x[:, context_only:], t[:, context_only:], torch.zeros(B, T, dtype=torch.long),
              clean=x if mode == "teacher_forcing" else None)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return model, counts


def test_full_attention_forward_matches_the_flop_counter(monkeypatch):
    model, counts = counted_forward("full", monkeypatch)
    ours = train_step_flops(model.config, T, H, W, batch=B, mode="full", backward=False)
    assert sum(counts.values()) == ours.total
    assert counts["aten.bmm"] == ours.attention  # q.k and p.v, all pairs
    assert ours.attention == 2 * 4 * 32 * B * (T * 16) ** 2  # depth x 4 D x pairs


@pytest.mark.parametrize("mode", ["causal", "teacher_forcing"])
def test_masked_forward_counts_matmuls_exactly_and_only_visible_pairs(mode, monkeypatch):
    model, counts = counted_forward(mode, monkeypatch)
    ours = train_step_flops(model.config, T, H, W, batch=B, mode=mode, backward=False)
    assert counts["aten.addmm"] == ours.per_token + ours.per_frame  # every linear layer
    if mode == "causal":
        mask, dense_pairs = attention.causal_mask(0, T, 16, "cpu", "sdpa"), (T * 16) ** 2
    else:
        mask, dense_pairs = attention.teacher_forcing_mask(T, 16, "cpu", "sdpa"), (2 * T * 16) ** 2
    assert counts["aten.bmm"] == 2 * 4 * 32 * B * dense_pairs  # the counter's dense attention
    assert visible_pairs(mode, T, 16) == int(mask.sdpa.sum())
    assert ours.attention == 2 * 4 * 32 * B * int(mask.sdpa.sum())


def test_context_only_frames_are_counted_once(monkeypatch):
    """Teacher forcing after a retrieved memory frame (clean copy only): the counter's matmuls and the mask's pairs."""
    model, counts = counted_forward("teacher_forcing", monkeypatch, context_only=1)
    ours = train_step_flops(model.config, T, H, W, batch=B, backward=False, context_only=1)
    every = train_step_flops(model.config, T, H, W, batch=B, backward=False)
    assert counts["aten.addmm"] == ours.per_token + ours.per_frame < every.per_token + every.per_frame
    mask = attention.teacher_forcing_mask(T, 16, "cpu", "sdpa", clean_only=1)
    pairs = int(mask.sdpa.sum())  # less one noisy frame's own 16 x 16
    assert visible_pairs("teacher_forcing", T, 16, 1) == pairs == visible_pairs("teacher_forcing", T, 16) - 16 * 16
    assert ours.attention == 2 * 4 * 32 * B * int(mask.sdpa.sum())
    with pytest.raises(ValueError, match="context_only 1 needs mode teacher_forcing"):
        train_step_flops(model.config, T, H, W, mode="causal", context_only=1)


def test_a_training_step_is_three_forwards():
    cfg = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2).config
    fwd = train_step_flops(cfg, T, H, W, batch=B, mode="full", backward=False)
    step = train_step_flops(cfg, T, H, W, batch=B, mode="full")
    assert step == tuple(3 * x for x in fwd)


def test_the_per_frame_part_is_counted_per_frame_not_per_token():
    cfg = VideoDiT.from_preset("base", in_channels=4, attention="causal").config
    small, wide = train_step_flops(cfg, 16, 16, 16), train_step_flops(cfg, 16, 32, 32)  # 4x the tokens per frame
    longer = train_step_flops(cfg, 32, 16, 16)  # 2x the frames
    assert wide.per_frame == small.per_frame and wide.per_token == 4 * small.per_token
    assert longer.per_frame == 2 * small.per_frame and longer.per_token == 2 * small.per_token
    # the old 6 x params x tokens (tokens of the pass, attention aside) overstates base at 16x16 latents, 16 frames
    old = 6 * count_params("base") * 2 * 16 * 64
    assert 1.3 < old / (small.per_token + small.per_frame) < 1.6


def test_bad_mode_and_shape_are_refused():
    cfg = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2).config
    with pytest.raises(ValueError, match="mode must be one of full, causal, teacher_forcing"):
        train_step_flops(cfg, T, H, W, mode="sparse")
    with pytest.raises(ValueError, match=r"\(3, 7, 8\) must be divisible"):
        train_step_flops(cfg, T, 7, W)


def test_matmul_sdpa_is_sdpa():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(matmul_sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
