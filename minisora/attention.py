"""Which keys a query may see (frame masks), and the one attention call, with its kernel chosen here.

A causal VideoDiT lets a token attend to every token of its own frame and of earlier frames, and to
none of later frames; a teacher-forcing pass runs a clean copy of the window before its noisy copy
(`teacher_forcing_mask`). Each mask is written once, as a FlexAttention `mask_mod` over token
indices: the SDPA kernel gets the same function evaluated into a dense bool matrix, the flex kernel
a BlockMask built from it, so both kernels see exactly the same pairs. Masks are cached by
(kind, frames, tokens, device, kernel): a training step or a rollout builds none after the first.

Long-short attention (`long_short_mask`) adds compressed memory keys in front of the full ones: the
key sequence is [memory tokens of older frames | full tokens]. Its flex form is one block-sparse
BlockMask; its SDPA form runs the query frames in chunks, each against only the keys some query of
the chunk can see (the memory of earlier frames and the full frames nearby), so a window of T frames
costs about T * (short + T / pool^2) frames of keys per query frame instead of T^2 / 2.

Kernels (`KERNELS`), chosen explicitly or by `resolve_kernel("auto", device)`:
- "sdpa": `scaled_dot_product_attention` with the bool mask (no mask where every key is visible);
- "flex": FlexAttention with the BlockMask, which skips fully masked blocks. Inside a compiled region
  (`VideoDiT.compile_blocks`, what `minisora train` uses on CUDA) the enclosing compile fuses it; eager
  callers get one compiled flex callable of their own. torch's CPU build compiles flex forward only
  (no backward on CPU), so "auto" picks flex on CUDA and SDPA elsewhere. On the CPU, heads smaller than
  FLEX_CPU_MIN_HEAD_DIM channels take a flex mask through SDPA (torch's CPU flex kernel got them wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple

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
# torch's compiled CPU FlexAttention returned wrong values (some NaN) for head_dim 8 and 16 with key lengths of 8 mod 16
# (torch 2.13.0 on an AVX2-only AMD EPYC, fp32 and bf16; head_dim 32 and 64 were exact): on the CPU, smaller heads
# take the same mask densely through SDPA
FLEX_CPU_MIN_HEAD_DIM = 32

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
    chunks: tuple[Chunk, ...] = ()  # SDPA by chunks of queries, each against the keys it can see (long-short)


class Chunk(NamedTuple):
    """Queries [start, stop) of a chunked SDPA pass, against keys `keys` (an index, None: all) under `mask`
    ((stop - start, len(keys)) bool, None: every one of those keys visible)."""
    start: int
    stop: int
    keys: Tensor | None
    mask: Tensor | None


def _causal_mod(first: int, tokens: int) -> MaskMod:
    def mod(b, h, q, kv):  # key frame <= query frame; queries start at frame `first`
        return kv // tokens <= q // tokens + first

    return mod


def _teacher_forcing_mod(frames: int, tokens: int, clean_only: int = 0) -> MaskMod:
    # the clean copy of `frames` frames is tokens [0, n); then the noisy copy of frames clean_only.., so noisy
    # token q stands where clean token q - shift does
    n, shift = frames * tokens, (frames - clean_only) * tokens

    def mod(b, h, q, kv):
        q_clean, kv_clean = q < n, kv < n
        q_frame = torch.where(q_clean, q, q - shift) // tokens
        kv_frame = torch.where(kv_clean, kv, kv - shift) // tokens
        clean_key = kv_clean & ((kv_frame < q_frame) | ((kv_frame == q_frame) & q_clean))
        own_noisy_frame = ~kv_clean & ~q_clean & (kv_frame == q_frame)
        return clean_key | own_noisy_frame

    return mod


def uncached_when_compiling(fn: Callable) -> Callable:
    """An lru_cache-wrapped fn, or under torch.compile the function itself: Dynamo traces the computation either
    way, and warns of possible silent errors when it meets the cache."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


@lru_cache(maxsize=64)
def _build(kind: str, first: int, frames: int, tokens: int, device: torch.device, kernel: str) -> FrameMask:
    if kind == "causal":
        q_len, kv_len, mod = frames * tokens, (first + frames) * tokens, _causal_mod(first, tokens)
    else:  # teacher forcing: `first` leading frames have a clean copy only
        q_len = kv_len = (2 * frames - first) * tokens
        mod = _teacher_forcing_mod(frames, tokens, first)
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
    device = torch.device(device)
    return uncached_when_compiling(_build)("causal", first, frames, tokens, device, resolve_kernel(kernel, device))


def teacher_forcing_mask(frames: int, tokens: int, device: torch.device, kernel: str = "auto",
                         clean_only: int = 0) -> FrameMask:
    """The mask of a teacher-forcing pass: a clean copy of the window's `frames` frames, then a noisy copy of its
    frames from `clean_only` on (2 * frames - clean_only frames; the first clean_only frames, e.g. retrieved
    memory, are context only). Clean frame i sees clean frames <= i (a causal pass at t = 0); noisy frame i sees
    clean frames < i and itself, exactly what a chunk-1 rollout with the KV cache shows it."""
    if not 0 <= clean_only < frames:
        raise ValueError(f"teacher forcing: clean_only {clean_only} must be in [0, frames {frames})")
    device = torch.device(device)
    build = uncached_when_compiling(_build)
    return build("teacher_forcing", clean_only, frames, tokens, device, resolve_kernel(kernel, device))


class LongShort(NamedTuple):
    """The frames of a long-short attention pass, relative to its first query frame (all in frames).

    Queries: `queries` frames from 0 (twice, clean copy then noisy copy, when teacher_forcing). Keys: `memory`
    frames of `memory_tokens` tokens from frame `memory_first`, then `full` frames of `tokens` tokens from
    `full_first` (twice in a teacher-forcing pass). A query frame i sees the memory of frames <= i - short and the
    full tokens of frames in (i - short, i]; in a teacher-forcing pass, noisy frame i sees the clean copy's frames
    in (i - short, i) and its own noisy frame, as a chunk-1 rollout with the KV cache shows it."""
    short: int
    tokens: int
    memory_tokens: int
    queries: int
    memory_first: int
    memory: int
    full_first: int
    full: int
    teacher_forcing: bool = False


def _long_short_mod(ls: LongShort) -> MaskMod:
    n_mem, copy = ls.memory * ls.memory_tokens, ls.full * ls.tokens  # memory keys; full keys of one copy

    def mod(b, h, q, kv):
        q_frame = (q % (ls.queries * ls.tokens)) // ls.tokens if ls.teacher_forcing else q // ls.tokens
        is_mem = kv < n_mem
        sees_memory = is_mem & (ls.memory_first + kv // ls.memory_tokens <= q_frame - ls.short)
        full = kv - n_mem  # < 0 for memory keys, which the is_mem terms decide
        k_frame = ls.full_first + (full % copy if ls.teacher_forcing else full) // ls.tokens
        near = ~is_mem & (k_frame > q_frame - ls.short) & (k_frame <= q_frame)
        if not ls.teacher_forcing:
            return sees_memory | near
        q_clean, k_clean = q < ls.queries * ls.tokens, full < copy
        clean_key = near & k_clean & ((k_frame < q_frame) | q_clean)
        own_noisy_frame = near & ~k_clean & ~q_clean & (k_frame == q_frame)
        return sees_memory | clean_key | own_noisy_frame

    return mod


def _chunks(mod: MaskMod, q_len: int, kv_len: int, q_tokens: int, frame_starts: Tensor, device,
            chunk_frames: int) -> tuple[Chunk, ...]:
    """Split the queries into chunks of `chunk_frames` frames of q_tokens tokens; each chunk gathers the key
    frames (starting at key indices `frame_starts`, a mask is constant over a frame) that any of its queries
    sees. The per-chunk masks are `mod` itself, evaluated on the gathered keys."""
    bounds = torch.cat([frame_starts, torch.tensor([kv_len])])
    frame_of = torch.arange(kv_len)
    firsts = torch.arange(0, q_len, q_tokens)  # (query frames,) the first token of each
    seen = mod(None, None, firsts[:, None], frame_starts[None, :])  # (query frames, key frames) bool
    chunks = []
    for a in range(0, len(firsts), chunk_frames):
        frames = seen[a:a + chunk_frames].any(dim=0).nonzero().flatten().tolist()
        keys = torch.cat([frame_of[bounds[f]:bounds[f + 1]] for f in frames]) if frames else frame_of[:0]
        start, stop = a * q_tokens, min(q_len, (a + chunk_frames) * q_tokens)
        sub = mod(None, None, torch.arange(start, stop)[:, None], keys[None, :])  # (chunk queries, keys) bool
        everything = len(keys) == kv_len
        chunks.append(Chunk(start, stop, None if everything else keys.to(device),
                            None if bool(sub.all()) else sub.to(device)))
    return tuple(chunks)


@lru_cache(maxsize=64)
def _build_long_short(ls: LongShort, device: torch.device, kernel: str, chunk_frames: int) -> FrameMask | None:
    copies = 2 if ls.teacher_forcing else 1
    q_len = copies * ls.queries * ls.tokens
    n_mem = ls.memory * ls.memory_tokens
    kv_len = n_mem + copies * ls.full * ls.tokens
    mod = _long_short_mod(ls)
    frame_starts = torch.cat([torch.arange(0, n_mem, ls.memory_tokens),
                              torch.arange(n_mem, kv_len, ls.tokens)])  # (key frames,)
    if bool(mod(None, None, torch.arange(q_len)[:, None], frame_starts[None, :]).all()):
        return None  # every key visible to every query (e.g. one query frame after the cache)
    if kernel == "flex":
        flex = create_block_mask(mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
        return FrameMask("long_short", q_len, kv_len, mod, None, flex)
    chunks = _chunks(mod, q_len, kv_len, ls.tokens, frame_starts, device, chunk_frames)
    return FrameMask("long_short", q_len, kv_len, mod, None, None, chunks)


def long_short_mask(ls: LongShort, device: torch.device, kernel: str = "auto",
                    chunk_frames: int | None = None) -> FrameMask | None:
    """The mask of a long-short pass (`LongShort`); None where every key is visible. SDPA runs it in chunks of
    `chunk_frames` query frames (default: `short`, at least 1)."""
    device = torch.device(device)
    chunk = max(1, ls.short) if chunk_frames is None else chunk_frames
    return uncached_when_compiling(_build_long_short)(ls, device, resolve_kernel(kernel, device), chunk)


def dense(mask: FrameMask) -> Tensor:
    """(q_len, kv_len) bool: the mask's rule evaluated at every pair (for tests and the chunked path's reference)."""
    return mask.mod(None, None, torch.arange(mask.q_len)[:, None], torch.arange(mask.kv_len)[None, :])


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
        if q.device.type == "cpu" and q.shape[-1] < FLEX_CPU_MIN_HEAD_DIM:  # the same pairs, by SDPA
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense(mask).to(q.device))
        return _flex(q, k, v, mask.flex)
    if mask is not None and mask.chunks:
        return torch.cat([_attend_chunk(q, k, v, chunk) for chunk in mask.chunks], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.sdpa)


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, chunk: Chunk) -> Tensor:
    """Queries [start, stop) of q (B, heads, Nq, d) against the keys the chunk gathers -> (B, heads, stop-start, d)."""
    if chunk.keys is not None:
        k, v = k.index_select(2, chunk.keys), v.index_select(2, chunk.keys)
    return F.scaled_dot_product_attention(q[:, :, chunk.start:chunk.stop], k, v, attn_mask=chunk.mask)
