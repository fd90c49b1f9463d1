"""The KV cache of a causal VideoDiT rollout.

A causal VideoDiT lets a token attend to its own frame and earlier frames only (minisora.attention).
Clean frames (t = 0) then never depend on what comes after them, so a rollout can compute their
keys and values once and keep them: `KVCache` holds, per transformer block, the rotated keys and the
values of clean (temporal-patch) frames, and the absolute frame position of the next frame;
`keep_last` rolls it. RoPE only sees position differences, so positions may grow past the training
window without changing a result (tests/test_kvcache.py checks this).

A long-short model (VideoDiT short_frames > 0) also caches each committed frame's memory tokens
(pooled keys and values, minisora.blocks) and keeps full keys only for the frames a next query can
still see at full resolution (`keep_full`, short_frames - 1 of them). In a rolling rollout of window W
and chunk c the cache then holds, per block, full keys and values of min(short - 1, W - c) frames
and memory of W - c frames: (short - 1) * tokens + (W - c) * tokens / pool^2 tokens, against
(W - c) * tokens without memory.

Keys and values live in preallocated buffers that grow by doubling: a pass writes its frames'
keys after the cached ones and attends to one slice of the buffer (no concatenation per block and
pass); dropping old frames moves a start index, and the live part moves to the buffer's front only
when the buffer's end is reached.

`KVRing` is the steady state of a frame-by-frame rolling rollout at a fixed shape: once the cache holds
window - 1 frames, each block's keys live in a ring of `window` frame slots, and a pass writes its one
new frame into the spare slot and attends to the whole ring. Unmasked attention does not depend on the
order of its keys (the keys were rotated at their own positions), so this is the same attention, and
every pass has the same shapes and the same tensors: what a compiled pass needs (VideoDiT.compile_rollout).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

REMEMBERED = 256  # `KVCache.remember`'s keys: a rollout meets steps + 1 times per (actions, guidance) pair


class _Buffer:
    """Keys and values (B, heads, tokens, head_dim) of consecutive frames of one block: live tokens [start, end)."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.start = self.end = 0

    def live(self) -> tuple[Tensor, Tensor] | None:
        return None if self.k is None else (self.k[:, :, self.start:self.end], self.v[:, :, self.start:self.end])

    def extend(self, k: Tensor, v: Tensor, commit: bool) -> tuple[Tensor, Tensor]:
        """Write k, v (B, heads, n, d) after the live tokens; views of live + new. commit: keep them."""
        if self.k is not None and self.k.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache holds batch {self.k.shape[0]}, got keys for batch {k.shape[0]}")
        n, live = k.shape[2], self.end - self.start
        if self.k is None or self.k.dtype != k.dtype or self.end + n > self.k.shape[2]:
            self._make_room(k, live + n)
        self.k[:, :, self.end:self.end + n] = k
        self.v[:, :, self.end:self.end + n] = v
        stop = self.end + n
        if commit:
            self.end = stop
        return self.k[:, :, self.start:stop], self.v[:, :, self.start:stop]

    def _make_room(self, like: Tensor, need: int) -> None:
        """Move the live tokens to the front of a buffer of at least `need` tokens (twice that when it grows)."""
        old = self.live()
        capacity = 0 if self.k is None else self.k.shape[2]
        if self.k is None or self.k.dtype != like.dtype or need > capacity:
            capacity = 2 * need
            b, h, _, d = like.shape
            self.k, self.v = (torch.empty(b, h, capacity, d, dtype=like.dtype, device=like.device) for _ in range(2))
        live = 0 if old is None else old[0].shape[2]
        if live:  # clones first: the old slice may overlap its destination
            k, v = old[0].clone(), old[1].clone()
            self.k[:, :, :live], self.v[:, :, :live] = k.to(like.dtype), v.to(like.dtype)
        self.start, self.end = 0, live

    def drop(self, tokens: int) -> None:
        self.start = min(self.end, self.start + tokens)


class KVCache:
    """Rotated keys and values of clean frames for each block of a causal VideoDiT.

    A forward pass with `kv_cache=cache` places its frames at positions `cache.position` on and
    attends to the cached frames before them; with `update_cache=True` it also appends its own keys
    and values (the caller makes sure those frames are clean, t = 0) and advances the position.
    `keep_last(n)` then drops all but the newest n frames (a rolling window).
    """

    static = False  # shapes change from pass to pass (KVRing's do not)

    def __init__(self, depth: int, position: int = 0):
        self.depth = depth
        self._remembered: dict = {}  # what `remember` keeps: not frames, so `reset` leaves it
        self.reset(position)

    def remember(self, key, make: Callable[[], object]):
        """make()'s value for `key`, computed once for this cache's rollout (VideoDiT keeps each pass's per-time
        modulations here: a rollout's frames step through the same times); at most REMEMBERED keys at once."""
        if key not in self._remembered:
            if len(self._remembered) >= REMEMBERED:
                self._remembered.clear()
            self._remembered[key] = make()
        return self._remembered[key]

    def reset(self, position: int = 0) -> None:
        """Forget every cached frame; the next frame fed goes to absolute frame `position`."""
        self._full = [_Buffer() for _ in range(self.depth)]
        self._memory = [_Buffer() for _ in range(self.depth)]
        # frames with full keys (the newest), frames with memory tokens (the newest), tokens per frame of each
        self.frames, self.memory_frames, self.tokens, self.memory_tokens, self.position = 0, 0, 0, 0, position

    @property
    def keys(self) -> list[Tensor | None]:
        """Each block's cached full keys (B, heads, frames * tokens, head_dim), or None."""
        return [None if b.k is None else b.live()[0] for b in self._full]

    @property
    def values(self) -> list[Tensor | None]:
        return [None if b.k is None else b.live()[1] for b in self._full]

    def past(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self._full[layer].live()

    def extend(self, layer: int, k: Tensor, v: Tensor, commit: bool = False) -> tuple[Tensor, Tensor]:
        """Keys and values (B, heads, cached + new tokens, head_dim) of the cached frames then the new ones
        (B, heads, new tokens, head_dim); commit: keep the new ones too (frames being committed, see `advance`)."""
        return self._full[layer].extend(k, v, commit)

    def extend_memory(self, layer: int, k: Tensor, v: Tensor, commit: bool = False) -> tuple[Tensor, Tensor]:
        """`extend` for memory tokens: the cached frames' memory then the new frames'."""
        return self._memory[layer].extend(k, v, commit)

    def store(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Append one block's keys/values (B, heads, new frames * tokens, head_dim) for frames being committed."""
        self.extend(layer, k, v, commit=True)

    def advance(self, frames: int, tokens: int, memory_tokens: int = 0) -> None:
        """After a committing pass of `frames` frames of `tokens` tokens each (and `memory_tokens` memory tokens
        each, long-short models): move the position on."""
        self.frames, self.tokens, self.position = self.frames + frames, tokens, self.position + frames
        if memory_tokens:
            self.memory_frames, self.memory_tokens = self.memory_frames + frames, memory_tokens

    def keep_full(self, frames: int) -> None:
        """Drop the full keys of all but the newest `frames` frames (memory tokens stay)."""
        if frames < 0:
            raise ValueError(f"keep_full needs frames >= 0, got {frames}")
        drop = max(0, self.frames - frames)
        for buffer in self._full:
            buffer.drop(drop * self.tokens)
        self.frames -= drop

    def keep_last(self, frames: int) -> None:
        """Drop the oldest cached frames so that at most `frames` remain (positions stay as they are)."""
        if frames < 0:
            raise ValueError(f"keep_last needs frames >= 0, got {frames}")
        self.keep_full(frames)
        drop = max(0, self.memory_frames - frames)
        for buffer in self._memory:
            buffer.drop(drop * self.memory_tokens)
        self.memory_frames -= drop


class KVRing:
    """A full rolling cache of `window - 1` clean frames in rings of `window` frame slots per block, for passes
    of one frame: `extend` writes the frame's keys and values into the spare slot (a tensor index, so the
    shapes never change) and returns the whole ring. An Euler step's keys there are overwritten by the next
    pass; a committing pass's `advance` keeps them (the slot becomes the newest frame's) and makes the oldest
    frame's slot the spare. No long-short memory."""

    static = True  # fixed shapes: a compiled pass may run on it

    def __init__(self, cache: KVCache, window: int):
        if cache.memory_frames or cache.frames != window - 1 or cache.keys[0] is None:
            raise ValueError(f"KVRing needs a cache of exactly window - 1 = {window - 1} frames and no memory, "
                             f"got {cache.frames} frames and {cache.memory_frames} memory frames")
        self.depth, self.frames, self.tokens, self.position = cache.depth, cache.frames, cache.tokens, cache.position
        self.memory_frames, self._remembered = 0, cache._remembered  # modulations stay remembered
        pad = [torch.zeros_like(k[:, :, :cache.tokens]) for k in cache.keys]  # the spare slot, last at first
        self.k = [torch.cat([k, p], dim=2) for k, p in zip(cache.keys, pad)]  # (B, heads, window * tokens, d)
        self.v = [torch.cat([v, p], dim=2) for v, p in zip(cache.values, pad)]
        self.slot = torch.arange(self.frames * self.tokens, window * self.tokens, device=self.k[0].device)

    remember = KVCache.remember

    def extend(self, layer: int, k: Tensor, v: Tensor, commit: bool = False) -> tuple[Tensor, Tensor]:
        """Write one frame's k, v (B, heads, tokens, head_dim) into the spare slot; the whole ring (any order)."""
        if k.shape[2] != self.tokens:
            raise ValueError(f"KVRing passes take one frame of {self.tokens} tokens, got {k.shape[2]} tokens")
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def advance(self, frames: int, tokens: int, memory_tokens: int = 0) -> None:
        """After the committing pass of one frame: its slot is kept, the oldest frame's becomes the spare."""
        if frames != 1 or tokens != self.tokens or memory_tokens:
            raise ValueError(f"KVRing advances by one frame of {self.tokens} tokens, got {frames} of {tokens}")
        self.slot.add_(tokens).remainder_(self.k[0].shape[2])  # in place: the same tensor for every pass
        self.position += 1

    def keep_last(self, frames: int) -> None:
        """A ring always keeps window - 1 frames: only that is accepted."""
        if frames != self.frames:
            raise ValueError(f"KVRing keeps {self.frames} frames, asked to keep {frames}")


class RingView:
    """A KVRing's tensors (each block's keys and values, then the spare slot) as the cache of one Euler-step pass:
    what a compiled region whose inputs are all tensors rebuilds inside (VideoDiT.euler_frame)."""

    static = True

    def __init__(self, kv: list[Tensor], slot: Tensor):
        self.k, self.v, self.slot, self.tokens = kv[0::2], kv[1::2], slot, slot.shape[0]

    extend = KVRing.extend


def ring_once_full(cache: KVCache | KVRing, window: int) -> KVCache | KVRing:
    """`cache` moved into a KVRing if it is a KVCache that now holds window - 1 frames, else `cache` itself: what a
    rolling rollout with compiled passes calls after each commit (DiTPipeline, LiveGenerator)."""
    return KVRing(cache, window) if not cache.static and cache.frames == window - 1 else cache
