"""The parts of a VideoDiT block: 3D RoPE, attention (with its KV cache and long-short memory), the block, the head.

Long-short attention (FAR, arXiv 2503.19325): a query frame sees the full-resolution keys and values of
the last `short_frames` frames (itself included) and, of every older frame, a compressed memory: that
frame's keys and values averaged over pool x pool patches of its token grid (no new parameters). Keys
are pooled before their rotation and rotated at the patch centre, so a memory token sits where the
tokens it summarises sat. Which memory frames a query sees is minisora.attention's `long_short_mask`;
here a pass computes the memory tokens of its frames (`Memory`) and puts them in front of the full
keys: [memory tokens | full tokens].
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from minisora.attention import FrameMask, attend
from minisora.kv_cache import KVCache


class PatchGrid(NamedTuple):
    """The patches of one pass: frames (temporal patches) x height x width."""
    frames: int
    height: int
    width: int


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How a head's channels split across (frame, row, column) rotations (Wan's split); all even."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(frames: int, height: int, width: int, head_dim: int, theta: float = 10000.0,
                frame_offset: float = 0.0, device=None, stride: float = 1.0) -> Tensor:
    """Rotation angles (frames*height*width, head_dim // 2), float32, tokens in (t, h, w) order.

    Channel pair i of a token at (t, h, w) is rotated by pos_axis * theta^(-2j / dim_axis) for the axis
    and index j that pair belongs to, so q.k of two tokens depends only on their position difference.
    Rows and columns sit at stride * index + (stride - 1) / 2: stride p gives the centres of p x p patches.
    """
    angles = []
    spatial = (stride - 1) / 2
    for size, dim, offset, step in zip((frames, height, width), rope_axis_dims(head_dim),
                                       (frame_offset, spatial, spatial), (1.0, stride, stride)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)  # (dim/2,)
        pos = torch.arange(size, dtype=torch.float64, device=device) * step + offset
        angles.append(torch.outer(pos, freqs))  # (size, dim/2)
    a_t, a_h, a_w = angles
    grid = torch.cat([  # broadcast each axis over the other two -> (T, H, W, head_dim/2)
        a_t[:, None, None, :].expand(frames, height, width, -1),
        a_h[None, :, None, :].expand(frames, height, width, -1),
        a_w[None, None, :, :].expand(frames, height, width, -1),
    ], dim=-1)
    return rearrange(grid, "t h w d -> (t h w) d").float()


@lru_cache(maxsize=256)
def rope_cos_sin(frames: int, height: int, width: int, head_dim: int, theta: float, frame_offset: int,
                 device: torch.device, stride: int = 1) -> tuple[Tensor, Tensor]:
    """cos and sin of `rope_angles`, each (frames*height*width, head_dim/2), cached: the passes of one rollout
    step (every Euler step and the commit) share their frame offset, and training windows share theirs."""
    angles = rope_angles(frames, height, width, head_dim, theta, frame_offset, device, stride)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, heads, N, head_dim) by angles with cos/sin (N, head_dim/2).

    Computed in x's dtype (cos/sin are cast to it): no fp32 copies of q and k under bf16. In fp32 one complex
    product (the same two products and a sum per channel, 6x faster on 64-token rollout steps); bf16 has no
    complex type, and torch.compile no complex kernels, so they take the pairs apart (compiled: fused)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))  # (B, heads, N, head_dim/2, 2)
    if x.dtype in (torch.float32, torch.float64) and x.stride(-1) == 1 and not torch.compiler.is_compiling():
        return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # each (B, heads, N, head_dim/2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # (B, heads, N, head_dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, T, S, D) with per-frame shift/scale (B, T, 1, D)."""
    return x * (1 + scale) + shift


class Memory(NamedTuple):
    """Long-short attention in one pass: which of its tokens are pooled into memory, and how many memory frames
    the keys hold. The pass's first `frames` frames (height x width tokens each) give memory tokens, pooled
    pool x pool; the keys are [cached memory | these frames' memory][:visible frames] + full tokens."""
    pool: int
    frames: int
    height: int
    width: int
    visible: int  # memory frames in the key sequence (cached ones first)
    cos: Tensor  # (frames * (height/pool) * (width/pool), head_dim/2): rotations at the patch centres
    sin: Tensor


def pool_tokens(x: Tensor, memory: Memory) -> Tensor:
    """x (B, heads, N, d) whose first memory.frames * height * width tokens are pooled -> (B, heads, F * M, d)."""
    p, f, h, w = memory.pool, memory.frames, memory.height, memory.width
    grid = rearrange(x[:, :, :f * h * w], "b n (f h ph w pw) d -> b n f h w (ph pw) d", f=f, h=h // p, ph=p, pw=p)
    return rearrange(grid.mean(dim=-2), "b n f h w d -> b n (f h w) d")  # mean over each p x p patch


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: FrameMask | None = None,
                cache: KVCache | None = None, layer: int = 0, update_cache: bool = False,
                memory: Memory | None = None) -> Tensor:
        q, k, v, mem_k, mem_v = self._qkv(x, cos, sin, memory)
        if cache is not None:  # cached clean frames come first: (B, heads, cached + N, head_dim), views of its buffer
            k, v = cache.extend(layer, k, v, commit=update_cache)
            if memory is not None:
                mem_k, mem_v = cache.extend_memory(layer, mem_k, mem_v, commit=update_cache)
        if memory is not None:  # [memory tokens | full tokens]
            seen = memory.visible * (memory.height // memory.pool) * (memory.width // memory.pool)
            k, v = torch.cat([mem_k[:, :, :seen], k], dim=2), torch.cat([mem_v[:, :, :seen], v], dim=2)
        out = attend(q, k, v, mask)
        return self.proj(out.transpose(1, 2).flatten(2))  # out (B, heads, N, head_dim) -> (B, N, D)

    def store(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
              memory: Memory | None = None) -> None:
        """Only append x's keys and values (and memory) to `cache` (as forward with update_cache=True, which also
        attends): what a committing pass needs of its last block."""
        _, k, v, mem_k, mem_v = self._qkv(x, cos, sin, memory)
        cache.extend(layer, k, v, commit=True)
        if memory is not None:
            cache.extend_memory(layer, mem_k, mem_v, commit=True)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor, memory: Memory | None):
        """x (B, N, D) -> rotated q, k and v, each (B, heads, N, head_dim), and the memory keys and values (or None)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # "b l (3 n d)->3 b n l d"
        # norms in the weights' dtype (fp32 under autocast: no bf16-vs-fp32 mix), q, k back in v's for the kernel
        dtype = self.qkv.weight.dtype
        q, k = self.q_norm(q.to(dtype)).to(v.dtype), self.k_norm(k.to(dtype)).to(v.dtype)
        mem_k = mem_v = None
        if memory is not None:  # pooled before the rotation, rotated at the patch centres
            mem_k, mem_v = apply_rope(pool_tokens(k, memory), memory.cos, memory.sin), pool_tokens(v, memory)
        q, k = apply_rope(torch.stack([q, k]), cos, sin)  # one rotation of both: (2, B, heads, N, head_dim)
        return q, k, v, mem_k, mem_v


class DiTBlock(nn.Module):
    """Pre-norm transformer block; each frame's conditioning sets its tokens' shift, scale and gates."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c: Tensor) -> Tensor:
        """The six per-frame modulations of c (B, T, D), in one (B, T, 1, 6 D): shift, scale and gate of the
        attention branch, then of the MLP's (a rollout reuses them from its KV cache: its frames share their times)."""
        return self.adaLN_modulation(c)[:, :, None]

    def forward(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, mask: FrameMask | None = None,
                cache: KVCache | None = None, layer: int = 0, update_cache: bool = False,
                memory: Memory | None = None) -> Tensor:
        # x (B, T, S, D) tokens per frame; mod (B, T, 1, 6 D) -> six (B, T, 1, D) modulations
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        frames = x.shape[1]
        h = modulate(self.norm1(x), shift_a, scale_a).flatten(1, 2)  # (B, T*S, D)
        h = self.attn(h, cos, sin, mask, cache, layer, update_cache, memory)
        x = x + gate_a * h.unflatten(1, (frames, -1))  # (B, T, S, D)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))

    def store(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
              memory: Memory | None = None) -> None:
        """Only append this block's keys and values of x (B, T, S, D) to `cache`: the attention branch up to them."""
        shift_a, scale_a = mod.chunk(6, dim=-1)[:2]  # each (B, T, 1, D)
        self.attn.store(modulate(self.norm1(x), shift_a, scale_a).flatten(1, 2), cos, sin, cache, layer, memory)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def modulation(self, c: Tensor) -> Tensor:
        """Shift and scale of c (B, T, D), in one (B, T, 1, 2 D)."""
        return self.adaLN_modulation(c)[:, :, None]

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod.chunk(2, dim=-1)  # each (B, T, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, S, out_dim)
