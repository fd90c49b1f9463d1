"""Retrieved memory: the earlier stretch of a clip that looks most like the present, put in front of the window.

A causal model with `retrieve_frames = M > 0` (`minisora train --retrieve-frames M`) sees, before every window
of W frames starting at frame s, M clean *memory frames* from the clip's own past, found by one rule (`recall`):

    j* = argmin over j in [0, s - W] of mean((x_j - x_s)^2)     (normalised latents; ties: the latest j)
    memory = x[j* + W - M : j* + W]

The earlier frame j* most like the window's first frame, and the stretch after it, aligned with the window
(memory frame i sits W frames before window frame W - M + i, the frame it should look like if the past repeats).
j* + W <= s: the stretch lies wholly in the past and does not overlap the window. No poses, no labels: it works
on any dataset, like the memory-answerable split (minisora.memory_split).

Training (`RetrievalWindows`): each window gets its memory from the ground-truth latents of its clip, and the
model sees [memory | window] as one sequence of M + W frames (positions 0..M+W-1, so a memory frame sits a fixed
W frames before the window frame it matches), with teacher forcing. The memory frames and the window's first
frame (the retrieval key, which the rollout knows) are left out of the loss (`loss_context`).

Rollout (`rollout`): chunk 1; for each new frame t the window is [t - W + 1, t], its key frame s = t - W + 1
is known (context or generated), the history is every known frame before it, and the same rule picks the memory.
The KV cache is rebuilt per generated frame ([memory | the W - 1 known window frames], at t = 0), then the new
frame is integrated against it: exactly the teacher-forcing pass's view of the window's last frame. A window
with no past yet (s < W) is rolled out without memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from minisora.dataset import LatentBatch, LatentWindows
from minisora.kv_cache import KVCache


def recall(latents: Tensor, start: int, window: int) -> int | None:
    """The memory anchor j* for the window starting at `start` of one clip's normalised latents (T, C, h, w):
    the frame j <= start - window closest (mean squared difference) to frame `start`, the latest on ties;
    None when start < window (no past that does not overlap the window)."""
    if start < window:
        return None
    past = latents[: start - window + 1].float()  # (J, C, h, w) the candidates
    dist = (past - latents[start].float()).square().flatten(1).mean(1)  # (J,)
    return int(len(dist) - 1 - torch.argmin(dist.flip(0)).item())


def memory_range(anchor: int, window: int, memory: int) -> tuple[int, int]:
    """Frames [first, stop) of the memory that `anchor` (recall's j*) gives a window of `window` frames."""
    return anchor + window - memory, anchor + window


def loss_context(batch: int, memory: int, window: int, device=None) -> Tensor:
    """(B, M + W) bool: the frames of a [memory | window] training sequence left out of the loss (the memory
    frames and the window's first frame, the retrieval key)."""
    return (torch.arange(memory + window, device=device) <= memory)[None].expand(batch, -1)


def check_setting(retrieve_frames: int, frames: int, attention: str, short_frames: int) -> None:
    """Refuse a --retrieve-frames the model cannot use, naming the option."""
    if retrieve_frames == 0:
        return
    if not 0 < retrieve_frames <= frames:
        raise ValueError(f"--retrieve-frames {retrieve_frames} must be in [0, --frames {frames}]")
    if attention != "causal" or short_frames:
        raise ValueError(f"--retrieve-frames {retrieve_frames} needs --attention causal and --short-frames 0 "
                         f"(got {attention!r} and {short_frames})")


class RetrievalWindows(LatentWindows):
    """Training sequences [memory | window] of M + W frames: windows of W frames starting at s >= W, each after
    the M memory frames `recall` picks from its clip. The sampler sees spans of 2 W frames (s = span start + W),
    so clips need at least 2 W latent frames."""

    def __init__(self, store, split: str, window: int, memory: int, cache_shards: int = 8):
        super().__init__(store, split, 2 * window, cache_shards=cache_shards)
        self.window, self.memory = window, memory

    def gather(self, shards: dict[int, dict[str, np.ndarray]], clips: np.ndarray, starts: np.ndarray,
               pin_memory: bool = False) -> LatentBatch:
        clips, starts = np.asarray(clips, np.int64), np.asarray(starts, np.int64)
        w, m = self.window, self.memory
        bad = np.flatnonzero((starts < 0) | (starts + 2 * w > self.lengths[clips]))
        if len(bad):
            j = int(bad[0])
            raise IndexError(f"span [{starts[j]}, {starts[j] + 2 * w}) of clip {clips[j]} leaves its "
                             f"{self.lengths[clips[j]]} latent frames")
        shape = (1, -1, 1, 1)  # the store's statistics over (T, C, h, w)
        mu, sd = self.stats_mean.view(shape), self.stats_std.view(shape)
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        cps = self.layout.clips_per_shard
        for clip, span in zip(clips.tolist(), starts.tolist()):
            arrays, row, s = shards[clip // cps], clip % cps, span + w
            past = (torch.from_numpy(arrays["mean"][row, : s + 1].astype(np.float32)) - mu) / sd  # (s+1, C, h, w)
            lo, hi = memory_range(recall(past, s, w), w, m)
            for name in self.names:
                arr = arrays[name][row]
                out[name].append(np.concatenate([arr[lo:hi], arr[s:s + w]]))  # (M + W, ...)
        tensors = {name: torch.from_numpy(np.stack(v)) for name, v in out.items()}
        tensors["actions"] = tensors["actions"].long()
        if pin_memory:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return LatentBatch(mean=tensors["mean"], logvar=tensors.get("logvar"), actions=tensors["actions"],
                           clip=torch.from_numpy(clips), start=torch.from_numpy(starts + w))


def memory_batch(latents: Tensor, start: int, window: int, memory: int) -> tuple[Tensor, Tensor] | None:
    """(memory latents (B, M, C, h, w), frame index of each (B, M)) for the window starting at `start` of every
    video of `latents` (B, T, C, h, w), each by `recall` on its own frames; None when start < window."""
    if start < window:
        return None
    index = []
    for b in range(latents.shape[0]):
        lo, hi = memory_range(recall(latents[b, : start + 1], start, window), window, memory)
        index.append(torch.arange(lo, hi, device=latents.device))
    index = torch.stack(index)  # (B, M)
    return latents[torch.arange(latents.shape[0], device=latents.device)[:, None], index], index


def rollout(pipe, latents: Tensor, plan: list[tuple[int, int, int]], actions: Tensor | None, solver,
            chunk: int, context_t: float) -> str:
    """Fill `latents` (B, T, C, h, w) frame by frame as the module docstring says; returns the cache mode
    ("window": the cache is rebuilt for every window)."""
    memory = pipe.config.retrieve_frames
    if chunk != 1 or context_t > 0:
        raise ValueError(f"a model with retrieved memory (retrieve_frames {memory}) rolls out with chunk 1 and "
                         f"clean context; got chunk {chunk}, context_t {context_t}")
    cache = KVCache(len(pipe.transformer.blocks))
    for i, (start, n, known) in enumerate(plan):
        noise = pipe._window_noise(latents, solver, i, len(plan), n)  # the other algorithms' draws
        act = None if actions is None else actions[:, start:start + n]
        found = memory_batch(latents, start, pipe.config.window_frames, memory) if n == pipe.config.window_frames \
            else None
        clean = latents[:, start:known]
        if found is not None:
            clean = torch.cat([found[0], clean], 1)  # (B, M + W - 1, C, h, w)
            if act is not None:
                act = torch.cat([torch.gather(actions, 1, found[1]), act], 1)
        cache.reset(position=0)
        pipe._commit(cache, clean, act, solver.guidance, 0, 0)
        new_act = None if act is None else act[:, clean.shape[1]:]
        velocity = pipe._velocity(new_act, solver.guidance, solver.bar, cache)
        latents[:, known:start + n] = solver.integrate(velocity, noise[:, known - start:], solver.steps,
                                                       shift=solver.shift)
    return "window"


def memory_line(retrieve_frames: int) -> str:
    """How a model with retrieved memory rolls out, for the user ("" without it)."""
    if not retrieve_frames:
        return ""
    return f", retrieved memory ({retrieve_frames} frames of the clip's past before each window)"


def with_memory(memory: int, window: int, t: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A training step's times t (B, M + W) and loss context (B, M + W) with the [memory | window] sequence's
    memory frames and key frame held out of the loss (memory frames clean, t = 0); unchanged without memory."""
    if not memory:
        return t, context
    mask = loss_context(t.shape[0], memory, window, t.device)
    t = torch.where(torch.arange(t.shape[1], device=t.device)[None] < memory, torch.zeros_like(t), t)
    return t, mask if context is None else context | mask
