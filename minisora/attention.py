"""Which keys a query may see (frame masks), and the one attention call, with its kernel chosen here.

A causal VideoDiT lets a token attend to every token of its own frame and of earlier frames, and to
none of later frames; a teacher-forcing pass runs a clean copy of the window before its noisy copy
(`teacher_forcing_mask`). Each mask is written once, as a FlexAttention `mask_mod` over token
indices: the SDPA kernel gets the same function evaluated into a dense bool matrix, the flex kernel
a BlockMask built from it, so both kernels see exactly the same pairs. Masks are cached by
(kind, frames, tokens, device, kernel): a training step or a rollout builds none after the first.

Kernels (`KERNELS`), chosen explicitly or by `resolve_kernel("auto", device)`:
- "sdpa": `scaled_dot_product_attention` with the bool mask (no mask where every key is visible);
- "flex": FlexAttention with the BlockMask, which skips fully masked blocks. Inside a compiled region
  (`VideoDiT.compile_blocks`, what `minisora train` uses on CUDA) the enclosing compile fuses it; eager
  callers get one compiled flex callable of their own. torch's CPU build compiles flex forward only
  (no backward on CPU), so "auto" picks flex on CUDA and SDPA elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch without FlexAttention
    create_block_mask = flex_attention = None

KERNELS = ("auto", "sdpa", "flex")
# eager flex calls compile once per (mask, shapes, dtype, grad mode); a long rollout with chunks > 1 meets up to
# about a window's worth of key lengths, more than Dynamo's default of 8 before it falls back to unfused code
FLEX_RECOMPILE_LIMIT = 64

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (batch, head, q_idx, kv_idx) -> bool


def flex_available() -> bool:
    return flex_attention is not None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """"sdpa" or "flex" for `kernel` on `device`; auto: flex on CUDA where it imports, else SDPA."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "flex" and not flex_available():
        raise ValueError(f"attention kernel flex: torch {torch.__version__} has no FlexAttention; use sdpa")
    if kernel == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    return kernel


@dataclass(frozen=True)
class FrameMask:
    """One attention mask: `mod` over token indices, and the form the kernel takes.

    sdpa: (Nq, Nk) bool, True where the query may attend (SDPA kernel), else None; flex: the BlockMask (flex
    kernel), else None."""

    kind: str
    q_len: int
    kv_len: int
    mod: MaskMod
    sdpa: Tensor | None
    flex: object | None


def _causal_mod(first: int, tokens: int) -> MaskMod:
    def mod(b, h, q, kv):  # key frame <= query frame; queries start at frame `first`
        return kv // tokens <= q // tokens + first

    return mod


def _teacher_forcing_mod(frames: int, tokens: int) -> MaskMod:
    n = frames * tokens  # tokens of one copy; the clean copy is [0, n), the noisy copy [n, 2n)

    def mod(b, h, q, kv):
        q_frame, kv_frame = (q % n) // tokens, (kv % n) // tokens
        q_clean, kv_clean = q < n, kv < n
        clean_key = kv_clean & ((kv_frame < q_frame) | ((kv_frame == q_frame) & q_clean))
        own_noisy_frame = ~kv_clean & ~q_clean & (kv_frame == q_frame)
        return clean_key | own_noisy_frame

    return mod


@lru_cache(maxsize=64)
def _build(kind: str, first: int, frames: int, tokens: int, device: torch.device, kernel: str) -> FrameMask:
    if kind == "causal":
        q_len, kv_len, mod = frames * tokens, (first + frames) * tokens, _causal_mod(first, tokens)
    else:
        q_len = kv_len = 2 * frames * tokens
        mod = _teacher_forcing_mod(frames, tokens)
    if kernel == "flex":
        flex = create_block_mask(mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
        return FrameMask(kind, q_len, kv_len, mod, None, flex)
    q = torch.arange(q_len, device=device)[:, None]  # (Nq, 1)
    kv = torch.arange(kv_len, device=device)[None, :]  # (1, Nk)
    return FrameMask(kind, q_len, kv_len, mod, mod(None, None, q, kv), None)  # (Nq, Nk) bool


def causal_mask(first: int, frames: int, tokens: int, device: torch.device, kernel: str = "auto") -> FrameMask | None:
    """Queries of frames [first, first + frames) against keys of frames [0, first + frames) (cached frames
    first), `tokens` tokens per frame; None where every key is visible (a single query frame)."""
    if frames == 1:
        return None
    return _build("causal", first, frames, tokens, torch.device(device), resolve_kernel(kernel, torch.device(device)))


def teacher_forcing_mask(frames: int, tokens: int, device: torch.device, kernel: str = "auto") -> FrameMask:
    """The mask of a teacher-forcing pass over 2 * frames frames: a clean copy of the window, then its noisy
    copy. Clean frame i sees clean frames <= i (a causal pass at t = 0); noisy frame i sees clean frames < i and
    itself, exactly what a chunk-1 rollout with the KV cache shows it."""
    device = torch.device(device)
    return _build("teacher_forcing", 0, frames, tokens, device, resolve_kernel(kernel, device))


_eager_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    if torch.compiler.is_compiling():  # the enclosing compiled region fuses it
        return flex_attention(q, k, v, block_mask=block_mask)
    global _eager_flex
    if _eager_flex is None:  # built here, never while tracing (Dynamo would keep the uncompiled function)
        _eager_flex = torch.compile(flex_attention, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        return _eager_flex(q, k, v, block_mask=block_mask)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: FrameMask | None) -> Tensor:
    """Attention of q (B, heads, Nq, d) over k, v (B, heads, Nk, d) under `mask` (None: all keys), by the
    kernel the mask was built for. q, k and v must share one dtype (FlexAttention has no mixed-dtype kernel)."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attend: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and mask.flex is not None:
        return _flex(q, k, v, mask.flex)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.sdpa)
