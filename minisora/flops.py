"""Model FLOPs of a VideoDiT training step, for model FLOP utilisation (MFU).

A matmul of an (m, k) by a (k, n) matrix is 2 m k n FLOPs; the backward pass costs twice the forward
(gradients of the inputs and of the weights), so a training step is 3 x forward. Counted, per sample:

- per token (N tokens of the pass): patch embedding, each block's qkv, output projection and MLP;
  the final linear over the tokens whose velocity is returned;
- per frame (F frames of the pass): the timestep MLP, each block's adaLN modulation (6 D outputs)
  and the final layer's (2 D). They run once per frame, not per token, since a frame's conditioning
  is shared by its h*w tokens; counting them per token (6 x params x tokens) overstates a base
  model's step by about 1.5x. The action embedding is a table lookup: no FLOPs;
- attention: scores (q . k) and values (p . v), 2 x head_dim x heads = 2 D FLOPs each per
  (query, key) pair the mask lets through, per block. Full attention lets through all N^2 pairs;
  causal, frame i's tokens see frames <= i; teacher forcing (a 2T-frame pass: the clean copy, then
  the noisy copy) lets clean frame i see clean frames <= i and noisy frame i clean frames < i and
  itself, as minisora.attention.teacher_forcing_mask does.
Norms, RoPE, softmax and other elementwise work are left out, as is usual for MFU (PaLM, Chinchilla).
A teacher-forcing pass runs the per-token and per-frame work over 2T frames, and the final layer over
the T noisy ones only (the model returns their velocity alone); with M context-only frames (retrieved
memory: a clean copy, no noisy one) over 2T - M frames, the final layer over T - M.
"""

from __future__ import annotations

from typing import NamedTuple

MODES = ("full", "causal", "teacher_forcing")


class StepFlops(NamedTuple):
    """FLOPs of one step (or one forward pass), split by what they scale with."""

    per_token: float  # matmuls applied to every token
    per_frame: float  # matmuls applied once per frame (conditioning, adaLN)
    attention: float  # scores and values over the (query, key) pairs the mask lets through

    @property
    def total(self) -> float:
        return self.per_token + self.per_frame + self.attention


def visible_pairs(mode: str, frames: int, tokens: int, context_only: int = 0) -> int:
    """(query, key) pairs attention computes for `frames` frames of `tokens` tokens (for teacher forcing: a clean
    copy of the frames and a noisy copy of those after the first `context_only`), under the mask of `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "full":
        return (frames * tokens) ** 2
    causal = tokens * tokens * frames * (frames + 1) // 2  # frame i (from 1) sees i frames
    # noisy frame i sees i clean frames and itself: the causal count, less the frames with no noisy copy
    return causal if mode == "causal" else 2 * causal - tokens * tokens * context_only * (context_only + 1) // 2


def train_step_flops(config, frames: int, height: int, width: int, batch: int = 1, mode: str = "teacher_forcing",
                     backward: bool = True, context_only: int = 0) -> StepFlops:
    """Model FLOPs of a training step of a VideoDiT with `config` (its .config) on a batch of `batch` windows of
    `frames` latent frames of height x width, with `mode` full, causal or teacher_forcing; forward only with
    backward=False. context_only: teacher forcing whose first frames have a clean copy only (retrieved memory)."""
    d, depth, pt, p = config.hidden_size, config.depth, config.patch_size_t, config.patch_size
    if frames % pt or height % p or width % p:
        raise ValueError(f"latents (T, H, W) = {(frames, height, width)} must be divisible by the patch "
                         f"{(pt, p, p)}")
    mlp, patch_dim = int(d * config.mlp_ratio), pt * p * p * config.in_channels
    if context_only and (mode != "teacher_forcing" or context_only % pt or not 0 < context_only < frames):
        raise ValueError(f"context_only {context_only} needs mode teacher_forcing and a multiple of the temporal "
                         f"patch {pt} below frames {frames}")
    t_, s, m = frames // pt, (height // p) * (width // p), context_only // pt  # patch frames, tokens per frame
    pass_frames = 2 * t_ - m if mode == "teacher_forcing" else t_  # the clean copy, then the noisy frames
    out_tokens, tokens = (t_ - m) * s, pass_frames * s  # velocity tokens; tokens of the pass
    linear = 2 * (d * 3 * d + d * d + 2 * d * mlp)  # qkv, proj, MLP: per token per block
    per_token = 2 * patch_dim * d * tokens + depth * linear * tokens + 2 * d * patch_dim * out_tokens
    time_mlp = 2 * (config.frequency_dim * d + d * d)  # TimestepEmbedding: two linears, per latent frame
    per_frame = (time_mlp * pass_frames * pt + depth * 2 * d * 6 * d * pass_frames  # blocks' adaLN
                 + 2 * d * 2 * d * (t_ - m))  # final layer's adaLN, noisy frames only
    attention = depth * 4 * d * visible_pairs(mode, t_, s, m)
    scale = batch * (3 if backward else 1)
    return StepFlops(scale * per_token, scale * per_frame, scale * attention)
