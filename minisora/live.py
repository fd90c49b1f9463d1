"""The live generator of `minisora play`: a causal world model rolled out one frame per step, each
frame conditioned on the action given at that step.

It is DiTPipeline's chunk-1 rolling KV-cache rollout (minisora.pipeline, `kv_cache="rolling"`), cut
into steps that each take one action:
- `reset()` puts the context's clean latent frames into a KVCache (minisora.kv_cache) at t = 0,
  the last window - 1 of them, with their recorded actions;
- `step(action)` integrates one new latent frame with the pipeline's Euler integrator and velocity (the
  run's prediction converted to a velocity on its path), every Euler step running only that frame's
  tokens against the cache, decodes it with the run's VAE, then adds the
  frame to the cache once, clean, and keeps the newest window - 1 frames. It is `propose` (sampling,
  interruptible between Euler steps), `decode` and `accept` (the cache update): a server can drop a
  frame made for an action that is no longer held, and decode one frame while the next is sampled
  (minisora.play_app).
The noise of a step is drawn as the pipeline draws it (a whole window from one generator, the new
frame last), so the same seed and actions give the pipeline's frames (tests/test_play.py checks it).

Only causal models with temporal patch 1 and an image VAE can be played: a full-attention model
would recompute its whole window for every frame, and a video VAE decodes several frames at once.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from minisora.errors import MinisoraError
from minisora.kv_cache import KVCache, ring_once_full
from minisora.pipeline import DiTPipeline
from minisora.vae import pixels_to_frames


class PlayError(MinisoraError, ValueError):
    """A run or context that cannot be played live; the message says why and what would work."""


class LiveFrame(NamedTuple):
    """One generated frame, as the page shows it."""
    pixels: np.ndarray | None  # uint8 (H, W, 3); None until `decode`
    action: int  # the action id it was conditioned on (-1: the null action)
    index: int  # frames generated since the last reset (0: the first after the context)
    steps: int  # Euler steps it took
    seconds: float  # wall time of its sampling, and of its decoding and cache update once done
    latent: torch.Tensor  # (1, 1, C, h, w) the normalised latent frame


class _Interrupted(Exception):
    """Raised inside a proposal's Euler loop when its caller no longer wants the frame."""


def check_playable(pipe: DiTPipeline, where: str) -> None:
    """Refuse a pipeline that cannot roll out one frame at a time cheaply; `where` names the run."""
    cfg = pipe.transformer.config
    attention = cfg.get("attention", "full")
    if attention != "causal":
        raise PlayError(f"{where}: this model was trained with attention={attention!r}; playing needs a causal model "
                        "(`minisora train --attention causal`, the default), whose KV cache makes each new frame cost "
                        "one frame of tokens; a full-attention model recomputes its whole window for every frame")
    if pipe.config.get("retrieve_frames", 0):
        raise PlayError(f"{where}: this model was trained with retrieved memory (--retrieve-frames "
                        f"{pipe.config.retrieve_frames}); play keeps one rolling KV cache and does not retrieve, so it "
                        "would show the model frames it never saw in training; sample or eval it instead")
    if cfg.patch_size_t != 1:
        raise PlayError(f"{where}: temporal patch {cfg.patch_size_t}; playing adds one latent frame per step and "
                        "needs patch_size_t 1")
    tc = pipe.video_vae.info.temporal_compression
    if tc != 1:
        raise PlayError(f"{where}: the VAE compresses time {tc}x; playing decodes one frame per step and needs an "
                        "image VAE (temporal compression 1)")


class LiveGenerator:
    """Frame-by-frame rollout of a causal DiTPipeline from context latents, one action per step.

    Args:
        pipe: a causal pipeline (check_playable).
        context: normalised context latents (1, K, C, h, w), K >= 1.
        context_actions: (K,) the actions recorded with the context frames (-1: none), or None.
        steps: Euler steps per frame (`steps` may be changed between steps).
        shift: the time shift (None: the pipeline's scheduler's).
        seed: seeds the noise; `reset()` restarts it, so a replay of the same actions gives the same frames.
        compile: once the cache holds window - 1 frames, keep it in a fixed-shape `KVRing` and run the compiled
            passes (VideoDiT.compile_rollout): the first frames after a start compile them, then frames come faster.
    """

    def __init__(self, pipe: DiTPipeline, context: torch.Tensor, context_actions: np.ndarray | None = None,
                 steps: int = 5, shift: float | None = None, seed: int = 0, compile: bool = False):
        check_playable(pipe, "the pipeline")
        if context.ndim != 5 or context.shape[0] != 1 or context.shape[1] < 1:
            raise ValueError(f"context latents must be (1, K >= 1, C, h, w), got {tuple(context.shape)}")
        self.pipe, self.model = pipe, pipe.transformer
        self.context = context.to(pipe.device, torch.float32)
        k = self.context.shape[1]
        acts = np.full(k, -1) if context_actions is None else np.asarray(context_actions)[:k]
        self.context_actions = torch.as_tensor(acts, dtype=torch.long, device=pipe.device)[None]  # (1, K)
        self.steps, self.seed = steps, seed
        self.shift = pipe.scheduler.config.shift if shift is None else shift
        self.window = pipe.config.window_frames
        self.integrate = pipe._integrator("euler")  # flow.euler_sample on the run's path, from its first time
        self.compile = compile
        if compile:
            self.model.compile_rollout()
        self.reset()

    @property
    def num_actions(self) -> int:
        return self.model.config.num_actions

    def _actions(self, acts: torch.Tensor) -> torch.Tensor | None:
        return acts if self.num_actions > 0 else None  # a model trained without actions takes none

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the context: the cache holds its last window - 1 frames, and the noise restarts from the seed."""
        k = self.context.shape[1]
        start = k - min(k, self.window - 1)
        self.cache = KVCache(len(self.model.blocks), position=start)
        t = torch.zeros(1, k - start, device=self.context.device)
        self.model.commit(self.context[:, start:], t, self.cache, self._actions(self.context_actions[:, start:]))
        self._ring_once_full()
        self.generator = torch.Generator().manual_seed(self.seed)
        self.known = k  # latent frames so far, context included
        self.index = 0  # frames accepted since the reset
        self.noise: torch.Tensor | None = None  # the next frame's noise (1, 1, C, h, w), kept until it is accepted

    def step(self, action: int) -> LiveFrame:
        """The next frame, conditioned on `action` (an id in [0, num_actions), or -1 for the null action)."""
        return self.accept(self.decode(self.propose(action)))

    @torch.no_grad()
    def propose(self, action: int, interrupt: Callable[[], bool] | None = None) -> LiveFrame | None:
        """The next frame's latent for `action`, sampled but not yet decoded (`decode`) nor part of the rollout
        (`accept` adds it), so a frame made for an action that is no longer held can be dropped. `interrupt()`
        is asked before every Euler step; if it says True the frame is abandoned and None returned. Either way
        the next proposal starts from the same noise: the frames depend on the seed and the accepted actions."""
        if action != -1 and not 0 <= action < self.num_actions:
            raise ValueError(f"action {action} must be in [0, {self.num_actions}) or -1 (none)")
        t0 = time.perf_counter()
        if self.noise is None:  # the pipeline's window for this frame, drawn whole; the new frame is its last
            _, _, c, h, w = self.context.shape
            n = min(self.known, self.window - 1) + 1
            self.noise = randn_tensor((1, n, c, h, w), generator=self.generator, device=self.context.device)[:, -1:]
        act = torch.full((1, 1), action, dtype=torch.long, device=self.context.device)
        # the pipeline's own velocity (the run's prediction converted on its path) and Euler integrator
        model_velocity = self.pipe._velocity(self._actions(act), 1.0, kv_cache=self.cache)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if interrupt is not None and interrupt():
                raise _Interrupted
            return model_velocity(x, t)

        try:
            latent = self.integrate(velocity, self.noise, self.steps, shift=self.shift)  # (1, 1, C, h, w)
        except _Interrupted:
            return None
        return LiveFrame(None, action, self.index, self.steps, time.perf_counter() - t0, latent)

    @torch.no_grad()
    def decode(self, frame: LiveFrame) -> LiveFrame:
        """The proposed frame with its pixels, decoded by the run's VAE (no state of the rollout is touched: it may
        run in another thread beside `accept` and the next `propose`), its decoding time added to `seconds`."""
        t0 = time.perf_counter()
        pixels = pixels_to_frames(self.pipe.decode_latents(frame.latent))[0, 0]  # (H, W, 3) uint8
        return frame._replace(pixels=np.asarray(pixels), seconds=frame.seconds + time.perf_counter() - t0)

    @torch.no_grad()
    def accept(self, frame: LiveFrame) -> LiveFrame:
        """Make a proposed frame (the latest `propose`) the rollout's next: it joins the KV cache once, clean, and
        the cache keeps the newest window - 1 frames. Returns it, with the time of the cache update added."""
        if frame.index != self.index:
            raise ValueError(f"frame {frame.index} was proposed before frame {self.index}: propose it again")
        t0 = time.perf_counter()
        act = torch.full((1, 1), frame.action, dtype=torch.long, device=self.context.device)
        self.model.commit(frame.latent, torch.zeros(1, 1, device=frame.latent.device), self.cache, self._actions(act))
        self.cache.keep_last(self.window - 1)
        self._ring_once_full()
        self.known, self.index, self.noise = self.known + 1, self.index + 1, None
        return frame._replace(seconds=frame.seconds + time.perf_counter() - t0)

    def _ring_once_full(self) -> None:
        """With compile: move a cache that holds window - 1 frames into a KVRing (the same frames, fixed shapes)."""
        if self.compile:
            self.cache = ring_once_full(self.cache, self.window)

    @torch.no_grad()
    def context_pixels(self) -> np.ndarray:
        """The context frames as the model sees them, decoded: uint8 (K, H, W, 3)."""
        return np.asarray(pixels_to_frames(self.pipe.decode_latents(self.context))[0])
