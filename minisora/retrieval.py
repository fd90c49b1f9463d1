"""Retrieved memory: for every frame, the frame that followed the earlier moment most like the frame before it.

A causal model with `retrieve_frames = M > 0` (`minisora train --retrieve-frames M`) sees, before every window of
W frames, M clean *memory frames* from the clip's own past, one for each of the window's last M frames, all found by
one rule (`memory_index`): for frame u,

    j* = argmin over j in [0, u - 1 - W] of mean((x_j - x_{u-1})^2)     (normalised latents; ties: the latest j)
    memory frame of u = x[j* + 1]

the frame that followed the earlier moment most like the frame before u. It is at least W frames older than u (out
of the window's reach), and its key x_{u-1} is a frame the model has already seen (known at every rollout step), so
nothing of u itself decides what is shown. No poses, no labels: it works on any dataset, like the
memory-answerable split (minisora.memory_split). When the past repeats (a circle turned again, a loop walked
again) it is the frame u will show; otherwise it is the best guess the past offers, and the model learns how far to
trust it.

Training (`RetrievalWindows`): each window gets its memory from the ground-truth latents of its clip, and the
model sees [memory | window] as one sequence of M + W frames (positions 0..M+W-1, so every memory frame sits a
fixed W frames before the window frame it stands for), with teacher forcing; the memory frames are clean context,
out of the loss (`with_memory`).

Rollout (`rollout`): chunk 1; for each new frame t the window is [t - W + 1, t], and the memory of its last M
frames comes by the same rule from every known frame (context or generated). The KV cache is rebuilt per
generated frame ([memory | the W - 1 known window frames], at t = 0), then the new frame is integrated against
it: exactly the teacher-forcing pass's view of the window's last frame. A window with too little past (start <= M)
rolls out without memory.

By pose (`--retrieve-motion`): a rollout's own frames drift, and a key that has drifted finds the wrong moment. When
the actions move the camera in a known way (a table of forward step and turn per action id, as a dataset card or the
synthetic renderer states it), the rule can key on where the camera is instead (`pose_index`): the camera's pose
(x, y, heading) is the sum of the actions' moves since frame 0 (`poses`, dead reckoning), and the memory frame of u is
the frame j <= u - W whose pose is nearest u's, in units of one action (distance / the longest step + heading
difference / the largest turn); among the frames within half an action of the best, the oldest (in a rollout, the
likeliest to be a known context frame rather than a generated one). Nothing but the actions decides it, so a drifting
rollout retrieves exactly what teacher forcing saw. It is only as right as the table: collisions, slides along
walls or a policy that moves other than its actions say make the poses drift (exact on the `revisit` family, whose
walks never slide). With a radius R > 0 (`--retrieve-radius`), a frame whose nearest pose is more than R actions
away gets a *blank* memory frame (`BLANK`: zero normalised latents, the null action) instead of a view from
elsewhere, so the model can tell "no memory here" from a memory to trust (WorldMem and Context-as-Memory likewise
retrieve only views that overlap the target's).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from minisora.dataset import LatentBatch, LatentWindows
from minisora.kv_cache import KVCache

BLANK = -1  # the memory "frame" of a frame with no pose within the radius: zero normalised latents, the null action


def recall(latents: Tensor, key: int, last: int) -> int | None:
    """The frame j <= `last` of one clip's normalised latents (T, C, h, w) closest (mean squared difference) to
    frame `key`, the latest on ties; None when last < 0."""
    if last < 0:
        return None
    past = latents[: last + 1].float()  # (J, C, h, w) the candidates
    dist = (past - latents[key].float()).square().flatten(1).mean(1)  # (J,)
    return int(len(dist) - 1 - torch.argmin(dist.flip(0)).item())


def memory_index(latents: Tensor, frame: int, window: int) -> int | None:
    """The memory frame of `frame` (module docstring): the one after recall's match of frame - 1 among the frames
    <= frame - 1 - window; None when there are none."""
    j = recall(latents, frame - 1, frame - 1 - window)
    return None if j is None else j + 1


def parse_motion(text: str) -> tuple[tuple[float, float], ...]:
    """`--retrieve-motion` "F:D,F:D,...": per action id (in order) its forward step F (any length unit) and turn D
    (degrees, positive = left); "" -> () (retrieve by latents)."""
    if not text.strip():
        return ()
    try:
        table = tuple((float(f), float(d)) for f, d in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise ValueError(f"--retrieve-motion {text!r}: give forward:turn_degrees per action id, comma-separated, "
                         f"e.g. 0.09:0,0:10,0:-10,0:0") from None
    if not any(f or d for f, d in table):
        raise ValueError(f"--retrieve-motion {text!r}: no action moves the camera")
    return table


def poses(actions: Tensor, motion: tuple[tuple[float, float], ...]) -> Tensor:
    """(..., T) action ids -> (..., T, 3) float64 poses (x, y, heading in radians) the actions integrate to, frame 0
    at (0, 0, 0); `actions[t]` moves into frame t (frame 0's is not used): a step along the heading, then the turn.
    A negative id (the null action: unknown) does not move the camera."""
    table = torch.tensor(motion, dtype=torch.float64, device=actions.device)  # (A, 2)
    moves = table[actions.clamp(min=0)] * (actions >= 0)[..., None]  # (..., T, 2)
    step, turn = moves[..., 0], torch.deg2rad(moves[..., 1])  # (..., T) each
    step[..., 0], turn[..., 0] = 0.0, 0.0
    heading = turn.cumsum(-1)  # after frame t's action
    before = heading - turn  # the heading frame t's step is taken along
    x, y = (step * before.cos()).cumsum(-1), (step * before.sin()).cumsum(-1)
    return torch.stack([x, y, heading], -1)


def pose_index(pose: Tensor, frame: int, window: int, motion: tuple[tuple[float, float], ...],
               radius: float = 0.0) -> int | None:
    """The memory frame of `frame` by pose (module docstring): among the frames <= frame - window of one clip's
    poses (T, 3), the oldest within half an action of the nearest; BLANK when radius > 0 and the nearest is more
    than radius actions away; None when there are no such frames."""
    last = frame - window
    if last < 0:
        return None
    step, turn = max(abs(f) for f, _ in motion), np.radians(max(abs(d) for _, d in motion))
    delta = pose[: last + 1] - pose[frame]  # (J, 3)
    dist = torch.zeros(last + 1, dtype=pose.dtype, device=pose.device)  # in actions
    if step:
        dist += delta[:, :2].norm(dim=1) / step
    if turn:
        dist += torch.remainder(delta[:, 2] + np.pi, 2 * np.pi).sub(np.pi).abs() / turn  # heading apart, in [0, pi]
    if radius > 0 and dist.min() > radius:
        return BLANK
    return int(torch.nonzero(dist <= dist.min() + 0.5)[0, 0])


def find_memory(latents: Tensor | None, pose: Tensor | None, frame: int, window: int,
                motion: tuple[tuple[float, float], ...], radius: float = 0.0) -> int | None:
    """The memory frame of `frame` in one clip: by pose when a motion table is given (BLANK beyond the radius),
    else by latents."""
    return pose_index(pose, frame, window, motion, radius) if motion else memory_index(latents, frame, window)


def loss_context(batch: int, memory: int, window: int, device=None) -> Tensor:
    """(B, M + W) bool: the frames of a [memory | window] training sequence left out of the loss (the memory)."""
    return (torch.arange(memory + window, device=device) < memory)[None].expand(batch, -1)


def check_setting(retrieve_frames: int, frames: int, attention: str, short_frames: int, motion: str = "",
                  use_actions: bool = True, radius: float = 0.0) -> None:
    """Refuse a --retrieve-frames (and --retrieve-motion, --retrieve-radius) the model cannot use, naming the option."""
    if motion and not (retrieve_frames and use_actions):
        raise ValueError(f"--retrieve-motion {motion!r} picks the memory frames of --retrieve-frames by the pose the "
                         f"actions integrate to: it needs --retrieve-frames > 0 and --use-actions")
    if radius < 0 or (radius and not motion):
        raise ValueError(f"--retrieve-radius {radius:g} blanks memory beyond that many actions of the pose: it needs "
                         "a value >= 0 and --retrieve-motion")
    parse_motion(motion)
    if retrieve_frames == 0:
        return
    if not 0 < retrieve_frames <= frames:
        raise ValueError(f"--retrieve-frames {retrieve_frames} must be in [0, --frames {frames}]")
    if attention != "causal" or short_frames:
        raise ValueError(f"--retrieve-frames {retrieve_frames} needs --attention causal and --short-frames 0 "
                         f"(got {attention!r} and {short_frames})")


class RetrievalWindows(LatentWindows):
    """Training sequences [memory | window] of M + W frames: windows of W frames starting at s > W, each after
    the memory frames `find_memory` gives its last M frames (by latents, or by pose with a motion table). The
    sampler sees spans of 2 W + 1 frames (s = span start + W + 1), so clips need at least 2 W + 1 latent frames."""

    def __init__(self, store, split: str, window: int, memory: int, cache_shards: int = 8,
                 motion: tuple[tuple[float, float], ...] = (), radius: float = 0.0):
        super().__init__(store, split, 2 * window + 1, cache_shards=cache_shards)
        self.window, self.memory, self.motion, self.radius = window, memory, motion, radius

    def gather(self, shards: dict[int, dict[str, np.ndarray]], clips: np.ndarray, starts: np.ndarray,
               pin_memory: bool = False) -> LatentBatch:
        clips, starts = np.asarray(clips, np.int64), np.asarray(starts, np.int64)
        w, m = self.window, self.memory
        bad = np.flatnonzero((starts < 0) | (starts + 2 * w + 1 > self.lengths[clips]))
        if len(bad):
            j = int(bad[0])
            raise IndexError(f"span [{starts[j]}, {starts[j] + 2 * w + 1}) of clip {clips[j]} leaves its "
                             f"{self.lengths[clips[j]]} latent frames")
        shape = (1, -1, 1, 1)  # the store's statistics over (T, C, h, w)
        mu, sd = self.stats_mean.view(shape), self.stats_std.view(shape)
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        cps = self.layout.clips_per_shard
        for clip, span in zip(clips.tolist(), starts.tolist()):
            arrays, row, s = shards[clip // cps], clip % cps, span + w + 1
            if self.motion:  # by pose: the actions alone decide, the latents are not read
                past, pose = None, poses(torch.from_numpy(arrays["actions"][row, : s + w].astype(np.int64)),
                                         self.motion)  # (s+W, 3)
            else:
                past = (torch.from_numpy(arrays["mean"][row, : s + w].astype(np.float32)) - mu) / sd  # (s+W, C, h, w)
                pose = None
            index = np.array([find_memory(past, pose, u, w, self.motion, self.radius)
                              for u in range(s + w - m, s + w)])  # the last M
            blank = index == BLANK
            for name in self.names:
                arr = arrays[name][row]
                mem = arr[np.where(blank, 0, index)]  # (M, ...)
                if blank.any():  # a point mass at the store's mean (zero once normalised), the null action
                    fill = {"mean": self.stats_mean.numpy()[:, None, None], "logvar": -np.inf, "actions": -1}[name]
                    mem[blank] = fill
                out[name].append(np.concatenate([mem, arr[s:s + w]]))  # (M + W, ...)
        tensors = {name: torch.from_numpy(np.stack(v)) for name, v in out.items()}
        tensors["actions"] = tensors["actions"].long()
        if pin_memory:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return LatentBatch(mean=tensors["mean"], logvar=tensors.get("logvar"), actions=tensors["actions"],
                           clip=torch.from_numpy(clips), start=torch.from_numpy(starts + w + 1))


def memory_batch(latents: Tensor, start: int, window: int, memory: int, pose: Tensor | None = None,
                 motion: tuple[tuple[float, float], ...] = (), radius: float = 0.0) -> tuple[Tensor, Tensor] | None:
    """(memory latents (B, M, C, h, w), frame index of each (B, M), BLANK for a blank one: zero latents) of the window
    starting at `start` of every video of `latents` (B, T, C, h, w), each by `find_memory` on its own frames (and
    poses (B, T, 3) with a motion table); None when start <= M (too little past)."""
    if start <= memory:
        return None
    frames = range(start + window - memory, start + window)  # the window's last M frames
    index = torch.tensor([[find_memory(video, None if pose is None else pose[b], u, window, motion, radius)
                           for u in frames] for b, video in enumerate(latents)], device=latents.device)  # (B, M)
    found = latents[torch.arange(latents.shape[0], device=latents.device)[:, None], index.clamp(min=0)]
    return torch.where((index == BLANK)[..., None, None, None], torch.zeros_like(found), found), index


def rollout(pipe, latents: Tensor, plan: list[tuple[int, int, int]], actions: Tensor | None, solver,
            chunk: int, context_t: float) -> str:
    """Fill `latents` (B, T, C, h, w) frame by frame as the module docstring says; returns the cache mode
    ("window": the cache is rebuilt for every window)."""
    memory = pipe.config.retrieve_frames
    if chunk != 1 or context_t > 0:
        raise ValueError(f"a model with retrieved memory (retrieve_frames {memory}) rolls out with chunk 1 and "
                         f"clean context; got chunk {chunk}, context_t {context_t}")
    motion = parse_motion(pipe.config.get("retrieve_motion") or "")
    if motion and actions is None:
        raise ValueError("this model retrieves its memory by the pose the actions integrate to (retrieve_motion "
                         f"{pipe.config.retrieve_motion!r}): give the rollout its actions")
    pose = poses(actions, motion) if motion else None  # (B, T, 3)
    radius = pipe.config.get("retrieve_radius") or 0.0
    cache = KVCache(len(pipe.transformer.blocks))
    for i, (start, n, known) in enumerate(plan):
        noise = pipe._window_noise(latents, solver, i, len(plan), n)  # the other algorithms' draws
        act = None if actions is None else actions[:, start:start + n]
        found = memory_batch(latents, start, pipe.config.window_frames, memory, pose, motion, radius) \
            if n == pipe.config.window_frames else None
        clean = latents[:, start:known]
        if found is not None:
            clean = torch.cat([found[0], clean], 1)  # (B, M + W - 1, C, h, w)
            if act is not None:
                remembered = torch.gather(actions, 1, found[1].clamp(min=0))  # (B, M); a blank's: the null action
                act = torch.cat([torch.where(found[1] == BLANK, -1, remembered), act], 1)
        cache.reset(position=0)
        pipe._commit(cache, clean, act, solver.guidance, 0, 0)
        new_act = None if act is None else act[:, clean.shape[1]:]
        velocity = pipe._velocity(new_act, solver.guidance, solver.bar, cache)
        latents[:, known:start + n] = solver.integrate(velocity, noise[:, known - start:], solver.steps,
                                                       shift=solver.shift)
    return "window"


def memory_line(retrieve_frames: int, motion: str = "", radius: float = 0.0) -> str:
    """How a model with retrieved memory rolls out, for the user ("" without it)."""
    if not retrieve_frames:
        return ""
    by = f", by the pose the actions integrate to ({motion})" if motion else ""
    by += f", blank beyond {radius:g} actions" if motion and radius > 0 else ""
    return f", retrieved memory ({retrieve_frames} frames of the clip's past before each window{by})"


def with_memory(memory: int, window: int, t: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A training step's times t (B, M + W) and loss context (B, M + W) with the [memory | window] sequence's
    memory frames held out of the loss (memory frames clean, t = 0); unchanged without memory."""
    if not memory:
        return t, context
    mask = loss_context(t.shape[0], memory, window, t.device)
    t = torch.where(torch.arange(t.shape[1], device=t.device)[None] < memory, torch.zeros_like(t), t)
    return t, mask if context is None else context | mask
