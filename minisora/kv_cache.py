"""Frame-causal attention helpers: the frame mask, the attention call per device, and the KV cache.

A causal VideoDiT lets a token attend to every token of its own frame and of earlier frames, and to
none of later frames. Clean frames (t = 0) then never depend on what comes after them, so a rollout
can compute their keys and values once and keep them: `KVCache` holds, per transformer block, the
rotated keys and the values of clean (temporal-patch) frames, and the absolute
frame position of the next frame; `keep_last` rolls it. RoPE only sees position differences, so positions may grow past
the training window without changing a result (tests/test_kvcache.py checks this).

The attention call is chosen at the edge: `scaled_dot_product_attention` with a boolean mask (or no
mask where every key is visible), and on CUDA FlexAttention with a block mask when it imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # CUDA only; the CPU path never needs it
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None

_compiled_flex = None


class FrameMask:
    """Which keys each query may see, for queries of frames [first, first + frames) against keys of
    frames [0, first + frames) (the cached ones first), `tokens` tokens per frame.

    `sdpa` is a (Nq, Nk) bool tensor (True: attend) or None where every key is visible (one query
    frame against earlier ones); `flex` is a FlexAttention BlockMask on CUDA, else None.
    """

    def __init__(self, first: int, frames: int, tokens: int, device: torch.device):
        q_frame = (torch.arange(frames, device=device) + first).repeat_interleave(tokens)  # (Nq,)
        k_frame = torch.arange(first + frames, device=device).repeat_interleave(tokens)  # (Nk,)
        self.sdpa = None if frames == 1 else k_frame[None, :] <= q_frame[:, None]
        self.flex = None
        if self.sdpa is not None and device.type == "cuda" and create_block_mask is not None:  # untested here
            self.flex = create_block_mask(lambda b, h, q, kv: k_frame[kv] <= q_frame[q], B=None, H=None,
                                          Q_LEN=len(q_frame), KV_LEN=len(k_frame), device=device)

    @classmethod
    def teacher_forcing(cls, frames: int, tokens: int, device: torch.device) -> "FrameMask":
        """The mask of a teacher-forcing pass over 2 * frames frames: a clean copy of the window first,
        then its noisy copy. Clean frame i sees clean frames <= i (as a causal pass at t = 0); noisy
        frame i sees clean frames < i and itself, exactly what a chunk-1 rollout with the KV cache shows it."""
        mask = cls.__new__(cls)
        frame = torch.arange(frames, device=device).repeat_interleave(tokens).repeat(2)  # (2 N,) frame of a token
        clean = torch.arange(2 * frames * tokens, device=device) < frames * tokens  # (2 N,) in the clean copy
        earlier = frame[None, :] < frame[:, None]  # (2N, 2N): key frame before query frame
        same = frame[None, :] == frame[:, None]
        mask.sdpa = (clean[None, :] & (earlier | (same & clean[:, None]))) | (~clean[None, :] & ~clean[:, None] & same)
        mask.flex = None
        if device.type == "cuda" and create_block_mask is not None:  # untested here
            allowed = mask.sdpa
            mask.flex = create_block_mask(lambda b, h, q, kv: allowed[q, kv], B=None, H=None,
                                          Q_LEN=len(frame), KV_LEN=len(frame), device=device)
        return mask


def attend(q: Tensor, k: Tensor, v: Tensor, mask: FrameMask | None) -> Tensor:
    """Attention of q (B, heads, Nq, d) over k, v (B, heads, Nk, d) under `mask` (None: all keys)."""
    if mask is not None and mask.flex is not None:  # CUDA: FlexAttention skips the masked blocks
        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask.flex)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.sdpa)


class KVCache:
    """Rotated keys and values of clean frames for each block of a causal VideoDiT.

    A forward pass with `kv_cache=cache` places its frames at positions `cache.position` on and
    attends to the cached frames before them; with `update_cache=True` it also appends its own keys
    and values (the caller makes sure those frames are clean, t = 0) and advances the position.
    `keep_last(n)` then drops all but the newest n frames (a rolling window).
    """

    def __init__(self, depth: int, position: int = 0):
        self.depth = depth
        self.reset(position)

    def reset(self, position: int = 0) -> None:
        """Forget every cached frame; the next frame fed goes to absolute frame `position`."""
        self.keys: list[Tensor | None] = [None] * self.depth  # each (B, heads, frames * tokens, head_dim)
        self.values: list[Tensor | None] = [None] * self.depth
        self.frames, self.tokens, self.position = 0, 0, position

    def past(self, layer: int) -> tuple[Tensor, Tensor] | None:
        k, v = self.keys[layer], self.values[layer]
        return None if k is None else (k, v)

    def store(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Append one block's keys/values (B, heads, new frames * tokens, head_dim) for frames being committed."""
        past = self.past(layer)
        if past is not None and past[0].shape[0] != k.shape[0]:
            raise ValueError(f"KVCache holds batch {past[0].shape[0]}, got keys for batch {k.shape[0]}")
        self.keys[layer] = k if past is None else torch.cat([past[0], k], dim=2)
        self.values[layer] = v if past is None else torch.cat([past[1], v], dim=2)

    def advance(self, frames: int, tokens: int) -> None:
        """After a committing pass of `frames` frames of `tokens` tokens each: move the position on."""
        self.frames, self.tokens, self.position = self.frames + frames, tokens, self.position + frames

    def keep_last(self, frames: int) -> None:
        """Drop the oldest cached frames so that at most `frames` remain (positions stay as they are)."""
        if frames < 0:
            raise ValueError(f"keep_last needs frames >= 0, got {frames}")
        drop = max(0, self.frames - frames)
        if drop:
            cut = drop * self.tokens
            self.keys = [None if k is None else k[:, :, cut:].contiguous() for k in self.keys]
            self.values = [None if v is None else v[:, :, cut:].contiguous() for v in self.values]
            self.frames -= drop
