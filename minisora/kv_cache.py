"""The KV cache of a causal VideoDiT rollout.

A causal VideoDiT lets a token attend to its own frame and earlier frames only (minisora.attention).
Clean frames (t = 0) then never depend on what comes after them, so a rollout can compute their
keys and values once and keep them: `KVCache` holds, per transformer block, the rotated keys and the
values of clean (temporal-patch) frames, and the absolute frame position of the next frame;
`keep_last` rolls it. RoPE only sees position differences, so positions may grow past the training
window without changing a result (tests/test_kvcache.py checks this).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
