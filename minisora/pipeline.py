"""DiTPipeline: generation, continuation and long rollouts with a trained VideoDiT and a VAE.

A diffusers `DiffusionPipeline` with three components (transformer: minisora's VideoDiT; vae: the
diffusers VAE the latent store was encoded with; scheduler: a FlowMatchEulerDiscreteScheduler that
only carries the time `shift`) and the latent statistics the model was trained with. Sampling
integrates the flow ODE with minisora.flow.euler_sample; context frames stay clean (t = 0);
videos longer than the training window are generated window by window: each window generates
`chunk` new latent frames conditioned on as many of the frames before them as fit in the window.

A trained run loads with `DiTPipeline.from_run(path, device, dtype)` (training writes it with `save_run`;
the format is minisora.run_dir's), a self-contained pipeline with diffusers' `from_pretrained`.
The call takes diffusers' names: `pipe(batch_size=1, num_inference_steps=20, height=64, width=64,
num_frames=20)`; `__call__` checks the inputs, then runs one of two rollout algorithms
(`_rollout_recompute` or `_rollout_kv_cache`), then decodes.

A causal transformer (attention="causal") rolls out with a KV cache (minisora.kv_cache) instead of
running the whole window at every Euler step: the clean frames' keys and values are computed at
t = 0 and kept per block, and each Euler step runs only the new frames' tokens against them.
- "rolling" (the default for causal models): each generated frame is added to the cache once, in
  one t = 0 pass, and the cache keeps the last window - chunk frames. A cached frame's deeper
  keys were computed with the frames before it, so beyond the first window this is sliding-window
  attention over the whole history, not the window recompute (identical in a one-block model).
- "window": each window recomputes its context frames once, at t = 0 (or noised at context_t, as the
  recompute shows them), then steps the new frames against them: identical to the window recompute
  (up to float rounding) at a smaller speed-up. "auto" takes it when known frames are shown noised.
- "off": the window recompute, the only mode of full-attention models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from minisora import pipeline_inputs as inputs, retrieval, run_dir
from minisora.configs import SAMPLERS, SDEConfig
from minisora.cached_passes import NESTED_REGIONS
from minisora.flow import euler_sample, heun_sample, noisy, time_grid
from minisora.interpolants import check_path, convert, sample_start
from minisora.kv_cache import KVCache, ring_once_full
from minisora.model import VideoDiT
from minisora.sde import sde_sample
from minisora.vae import VideoVAE, frames_to_pixels, pixels_to_frames


@dataclass
class VideoOutput:
    frames: np.ndarray | torch.Tensor  # uint8 (B, T, H, W, 3), or float (B, T, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (B, T', C, h, w) normalised latents, context included
    context_frames: int  # how many leading latent frames were given, not generated
    kv_cache: str = "off"  # how the rollout ran: "rolling" or "window" (KV cache of a causal model) or "off"


class _Solver(NamedTuple):
    """How every window of a rollout integrates: what both rollout algorithms share."""
    integrate: Callable  # minisora.flow.euler_sample, heun_sample or minisora.sde.sde_sample, with the path bound
    steps: int
    shift: float
    guidance: float
    generator: torch.Generator | None
    bar: Any  # a progress bar, or None


class DiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: VideoDiT, vae, scheduler: FlowMatchEulerDiscreteScheduler,
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
                 window_frames: int = 8, latent_size: list[int] | None = None, fps: float | None = None,
                 frame_stride: int = 1, resolution: list[int] | None = None, path: str = "linear",
                 prediction: str = "velocity", retrieve_frames: int = 0, retrieve_motion: str = "",
                 retrieve_radius: float = 0.0):
        super().__init__()
        check_path(path, prediction)  # the interpolant the transformer was trained on, and what it predicts
        transformer.eval()  # sampling: no action dropout (a DiT built with from_config starts in train mode)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        c = transformer.config.in_channels
        self.register_to_config(latents_mean=list(latents_mean or [0.0] * c),
                                latents_std=list(latents_std or [1.0] * c), window_frames=window_frames,
                                latent_size=list(latent_size or [16, 16]), fps=None if fps is None else float(fps),
                                frame_stride=frame_stride, resolution=None if resolution is None else list(resolution),
                                path=path, prediction=prediction, retrieve_frames=retrieve_frames,
                                retrieve_motion=retrieve_motion, retrieve_radius=float(retrieve_radius))
        self.video_vae = VideoVAE.from_model(vae)

    # ------------------------------------------------------------------ the run directory (minisora.run_dir)
    @classmethod
    def from_run(cls, path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> "DiTPipeline":
        """A pipeline from a training run (its newest checkpoint), a checkpoint, its `pipeline/` directory, or a
        `save_pretrained` directory, on `device`; the transformer in `dtype` (default: bf16 on CUDA, else
        float32), the VAE and the integration in float32."""
        return run_dir.load_run(cls, path, device, dtype)

    @staticmethod
    def save_run(path: str | Path, transformer: VideoDiT, weights: dict[str, torch.Tensor], store, cfg) -> None:
        """Write a checkpoint's `pipeline/` directory: `transformer`'s config with `weights` (the EMA), and the
        description (VAE, latent statistics, geometry) of the latent `store` and training `cfg` it was trained on."""
        run_dir.save_run(Path(path), transformer, weights, store, cfg)

    # ------------------------------------------------------------------ latent <-> pixels
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, 1, -1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, T', C, h, w) -> what the transformer sees: (raw - mean_c) / std_c, float32, with the
        per-channel statistics of the store it was trained on. decode_latents undoes it."""
        mu, sd = self._stats(raw)
        return (raw.float() - mu) / sd

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) frames -> normalised latents (B, T', C, h, w) (posterior means)."""
        pixels = frames_to_pixels(frames).to(self.device, self.vae.dtype)  # (B, T, 3, H, W)
        mean, _ = self.video_vae.encode(pixels)
        return self.normalize_latents(mean)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """Normalised latents (B, T', C, h, w) -> pixels (B, T, 3, H, W) in [-1, 1]."""
        mu, sd = self._stats(latents)
        raw = (latents.float() * sd + mu).to(self.vae.dtype)
        if self.video_vae.info.temporal_compression > 1:  # a video VAE decodes the clip as a whole
            return self.video_vae.decode(raw).float()
        return torch.cat([self.video_vae.decode(raw[:, i:i + chunk]).float() for i in range(0, raw.shape[1], chunk)],
                         dim=1)

    # ------------------------------------------------------------------ sampling
    def _velocity(self, actions: torch.Tensor | None, guidance: float, bar=None, kv_cache: KVCache | None = None):
        """v(x_t, t) for euler_sample: the transformer, with classifier-free guidance on actions when
        guidance != 1 (one batched call: conditional and null-action halves), attending to `kv_cache`
        if given (then holding both halves), its prediction converted to a velocity on the pipeline's path
        (minisora.interpolants; guidance commutes with the conversion). Ticks `bar` once per call."""
        model = self.transformer
        path, prediction = self.config.get("path", "linear"), self.config.get("prediction", "velocity")

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if actions is None or guidance == 1.0:
                v = model(x, t, actions, kv_cache=kv_cache).float()
            else:
                both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([actions, torch.full_like(actions, -1)]),
                             kv_cache=kv_cache).float()
                cond, uncond = both.chunk(2)
                v = uncond + guidance * (cond - uncond)  # classifier-free guidance on actions
            if prediction != "velocity":
                v = convert(v, x.float(), t, path, prediction, "velocity")
            if bar is not None:
                bar.update(1)
            return v

        return fn

    def rollout_plan(self, total: int, given: int, chunk: int) -> list[tuple[int, int, int]]:
        """Windows (start, length, first new frame) covering latent frames [given, total).

        Without context, a full-attention model's first window generates a whole training window; a
        causal model's generates `chunk` frames like every other (its first frame sees no earlier one, as
        frame 0 of a teacher-forced window does). Every other window generates the next `chunk` frames,
        conditioned on as many frames before them as fit in the window (window - chunk), so a window may
        be shorter than the training window at the start.
        """
        window = self.config.window_frames
        first = chunk if self.transformer.config.attention == "causal" else window
        if not 0 <= given < total:
            raise ValueError(f"num_frames {total} must exceed the {given} context latent frames")
        if not 0 < chunk < window:
            raise ValueError(f"chunk {chunk} must be in [1, {window - 1}] for windows of {window} latent frames")
        plan, known = [], given
        while known < total:
            new = min(first if known == 0 else chunk, total - known)
            start = known - min(known, window - new)
            plan.append((start, known - start + new, known))
            known += new
        return plan

    def check_guidance(self, guidance: float) -> None:
        """Refuse a guidance scale other than 1 for a model trained without actions (it would be ignored)."""
        if guidance != 1.0 and self.transformer.config.num_actions == 0:
            raise ValueError(f"--guidance {guidance:g}: classifier-free guidance is on actions, and this model was "
                             "trained without them (num_actions 0); use --guidance 1 or a model trained with "
                             "--use-actions")

    @torch.no_grad()
    def __call__(self, *, batch_size: int = 1, num_inference_steps: int = 20, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, context_latents: torch.Tensor | None = None,
                 context_frames: np.ndarray | torch.Tensor | None = None, actions: torch.Tensor | None = None,
                 guidance: float = 1.0, shift: float | None = None, chunk: int = 1,
                 generator: torch.Generator | None = None, output_type: str = "uint8", progress: bool = True,
                 kv_cache: str = "auto", context_t: float = 0.0, sampler: str = "euler",
                 sde: SDEConfig | None = None, compile: bool = False) -> VideoOutput:
        """Generate (or continue) videos of `num_frames` latent frames, context included.

        Args:
            batch_size: videos to generate without context (with context: one per context video).
            num_inference_steps: Euler steps per rollout window.
            num_frames: latent frames in all, context included (default: the window; more roll out: rollout_plan).
            height, width: pixels per frame (default: the training size, or the context's); each must be a
                multiple of the VAE's spatial compression times the transformer's patch size.
            context_latents: normalised latents (B, K, C, h, w) to continue, or context_frames: uint8 pixels
                (B, T, H, W, 3) that the pipeline's VAE encodes.
            actions: (B, num_frames) ints in [0, num_actions), one per latent frame (-1: none), or None.
            guidance: > 1 pushes the sample towards `actions` (classifier-free guidance against the null action).
            shift: the time shift (default: the scheduler's). sampler: "euler", "heun" (2 steps - 1 model calls) or
                "sde" (SiT's Euler-Maruyama, minisora.sde, with the options `sde`; its noise from `generator`).
            chunk: new latent frames per rollout window (1: frame by frame; docs/design-notes.md compares sizes).
            generator: draws the noise of every window, in order. progress: a bar, one tick per model call.
            output_type: "uint8" -> (B, T, H, W, 3), "float" -> (B, T, 3, H, W) in [-1, 1], "latent": no decoding.
            kv_cache: "auto" (rolling for causal models, off for full ones), "rolling", "window" or "off" (see
                the module docstring); the mode used is in the output's `kv_cache`.
            context_t: the noise level of known frames (minisora.flow.euler_sample; 0: clean). Every window noises
                them by its own draws: "auto" takes the "window" cache for context_t > 0, and "rolling" refuses it.
            compile: torch.compile a chunk-1 rolling rollout's passes once its cache is full (VideoDiT.compile_rollout).
        """
        # 1. check the inputs
        integrate = self._integrator(sampler, generator, sde)
        if output_type not in ("uint8", "float", "latent"):
            raise ValueError(f"output_type must be uint8, float or latent, got {output_type!r}")
        self.check_guidance(guidance)
        ctx = inputs.context_latents(self, context_latents, context_frames)
        batch, given = (ctx.shape[0], ctx.shape[1]) if ctx is not None else (batch_size, 0)
        total = num_frames or self.config.window_frames
        plan = self.rollout_plan(total, given, chunk)  # validates total and chunk
        mode = self.kv_cache_mode(kv_cache, context_t)
        if compile:  # refused where it cannot apply
            inputs.compile_rollout(self, mode, chunk)
        if actions is not None:
            actions = inputs.check_actions(actions, self.transformer.config.num_actions, batch, total, self.device)
        h, w = inputs.latent_size(self, height, width, ctx)

        # 2. roll out window by window: the known frames of `latents` (B, T', C, h, w) condition the new ones
        latents = torch.zeros(batch, total, self.transformer.config.in_channels, h, w, device=self.device)
        if ctx is not None:
            latents[:, :given] = ctx
        calls = 2 * num_inference_steps - 1 if sampler == "heun" else num_inference_steps
        bar = self.progress_bar(total=len(plan) * calls) if progress else None  # one tick per model call
        solver = _Solver(integrate, num_inference_steps, self.scheduler.config.shift if shift is None else shift,
                        guidance, generator, bar)
        if self.config.get("retrieve_frames", 0):  # memory frames before each window: minisora.retrieval
            mode = retrieval.rollout(self, latents, plan, actions, solver, chunk, context_t)
        elif mode == "off":
            self._rollout_recompute(latents, plan, actions, solver, context_t)
        else:
            self._rollout_kv_cache(latents, plan, actions, solver, mode, chunk, context_t, compile)
        if bar is not None:
            bar.close()
        # 3. decode
        if output_type == "latent":
            return VideoOutput(latents, latents, given, mode)
        pixels = self.decode_latents(latents)
        return VideoOutput(pixels if output_type == "float" else pixels_to_frames(pixels), latents, given, mode)

    def _rollout_recompute(self, latents: torch.Tensor, plan: list[tuple[int, int, int]],
                           actions: torch.Tensor | None, solver: _Solver, context_t: float) -> None:
        """Fill `latents` window by window, running the whole window at every Euler step; its known frames
        are held clean (t = 0) or at context_t."""
        for i, (start, n, known) in enumerate(plan):
            noise = self._window_noise(latents, solver, i, len(plan), n)
            act = None if actions is None else actions[:, start:start + n]
            mask = torch.zeros(latents.shape[0], n, dtype=torch.bool, device=latents.device)
            mask[:, : known - start] = True  # frames already known stay clean (t = 0) or at context_t
            out = solver.integrate(self._velocity(act, solver.guidance, solver.bar), noise, solver.steps,
                                   shift=solver.shift, context=latents[:, start:start + n], context_mask=mask,
                                   context_t=context_t)
            latents[:, known:start + n] = out[:, known - start:]

    def _rollout_kv_cache(self, latents: torch.Tensor, plan: list[tuple[int, int, int]],
                          actions: torch.Tensor | None, solver: _Solver, mode: str, chunk: int,
                          context_t: float = 0.0, ring: bool = False) -> None:
        """Fill `latents` window by window with a causal transformer's KV cache: the known frames' keys and
        values are computed once at t = 0, and each Euler step runs only the new frames against them.
        mode "window" recomputes the cache per window, with known frames noised at context_t > 0 as the
        recompute shows them (by the window's own draws); "rolling" adds each new frame once and keeps the
        last window - chunk frames (see the module docstring); ring: once it holds them, in a fixed-shape `KVRing`,
        each frame in one compiled call where `_whole_frame_times` allows (VideoDiT.euler_frame)."""
        cache, window = KVCache(len(self.transformer.blocks)), self.config.window_frames
        times = self._whole_frame_times(solver, actions) if ring else None
        for i, (start, n, known) in enumerate(plan):
            noise = self._window_noise(latents, solver, i, len(plan), n)
            act = None if actions is None else actions[:, start:start + n]
            if mode == "window" or i == 0:  # (re)compute the context frames' keys and values
                cache.reset(position=start)
                known_frames = latents[:, start:known]
                if context_t > 0:  # "window" only (kv_cache_mode): shown as the recompute's held_context shows them
                    t = torch.full(known_frames.shape[:2], context_t, device=latents.device)
                    known_frames = noisy(known_frames, noise[:, :known - start], t, self.config.get("path", "linear"))
                self._commit(cache, known_frames, act, solver.guidance, start, start, context_t)
            new_act = None if act is None else act[:, known - start:]
            if times is not None and cache.static:  # a frame's steps and its commit in one compiled call
                frame = self.transformer.euler_frame(noise[:, known - start:], times, cache, new_act)
                latents[:, known:start + n] = frame
                if solver.bar is not None:
                    solver.bar.update(solver.steps)
                continue
            velocity = self._velocity(new_act, solver.guidance, solver.bar, cache)
            out = solver.integrate(velocity, noise[:, known - start:], solver.steps,
                                   shift=solver.shift)  # the same noise draws as the window recompute
            latents[:, known:start + n] = out
            if mode == "rolling" and i + 1 < len(plan):  # the new frames join the cache once, clean
                self._commit(cache, out, act, solver.guidance, start, known)
                cache.keep_last(window - chunk)
                if ring:  # once full, the same shapes from now on
                    cache = ring_once_full(cache, window)

    def _whole_frame_times(self, solver: _Solver, actions: torch.Tensor | None) -> torch.Tensor | None:
        """The sampling times for VideoDiT.euler_frame where a compiled rolling rollout can run each frame in one
        call (Euler steps of a velocity model without guidance, torch >= 2.8), else None (pass by pass)."""
        integrate, prediction = solver.integrate, self.config.get("prediction", "velocity")
        if (integrate.func is not euler_sample or prediction != "velocity" or not NESTED_REGIONS
                or (actions is not None and solver.guidance != 1.0)):
            return None
        return time_grid(solver.steps, solver.shift, device=self.device, start=integrate.keywords["start"])

    def _window_noise(self, latents: torch.Tensor, solver: _Solver, i: int, windows: int, n: int) -> torch.Tensor:
        """Window i's starting noise (B, n, C, h, w), drawn whole (known frames included) whatever the rollout
        algorithm, so every algorithm sees the same draws."""
        if solver.bar is not None:
            solver.bar.set_description(f"window {i + 1}/{windows}")
        batch, _, c, h, w = latents.shape
        return randn_tensor((batch, n, c, h, w), generator=solver.generator, device=latents.device)

    # ------------------------------------------------------------------ integrator, rollout mode, cache commits
    def _integrator(self, sampler: str, generator: torch.Generator | None = None, sde: SDEConfig | None = None):
        """`sampler`'s integrator with the pipeline's path bound, starting where its prediction gives a velocity
        (minisora.interpolants.sample_start); the sde's noise comes from `generator`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        sde = sde or SDEConfig()
        path, prediction = self.config.get("path", "linear"), self.config.get("prediction", "velocity")
        bound = {"path": path, "start": sample_start(path, prediction, sde.diffusion if sampler == "sde" else None)}
        if sampler == "sde":
            return partial(sde_sample, sde=sde, generator=generator, **bound)
        return partial(heun_sample if sampler == "heun" else euler_sample, **bound)

    def rollout_line(self, kv_cache: str, compiled: bool = False) -> str:
        """How the transformer rolls out in mode `kv_cache`, for the user: its attention and the KV cache mode (and
        whether its passes are compiled once the cache is full: `__call__`'s compile)."""
        how = "window recompute at every Euler step" if kv_cache == "off" else f"KV cache ({kv_cache})"
        how += ", compiled once full" if compiled else ""
        how += retrieval.memory_line(self.config.get("retrieve_frames", 0), self.config.get("retrieve_motion", ""),
                                     self.config.get("retrieve_radius") or 0.0)
        tcfg = self.transformer.config
        if tcfg.get("short_frames", 0):  # long-short: say how far it sees in full
            return (f"{tcfg.attention} attention, long-short (the last {tcfg.short_frames} frames in full, older "
                    f"ones pooled {tcfg.memory_pool}x{tcfg.memory_pool}), {how}")
        return f"{tcfg.attention} attention, {how}"

    def kv_cache_mode(self, kv_cache: str = "auto", context_t: float = 0.0) -> str:
        """The rollout mode for `kv_cache` ("auto", "rolling", "window", "off"), this transformer and the noise level
        context_t of known frames (minisora.pipeline_inputs.kv_cache_mode: "auto" takes "window" when it is > 0);
        a model with retrieved memory rebuilds its cache for every window whatever was asked (minisora.retrieval)."""
        mode = inputs.kv_cache_mode(self.transformer.config, kv_cache, context_t)
        return "window" if self.config.get("retrieve_frames", 0) else mode

    def _commit(self, cache: KVCache, clean: torch.Tensor, window_actions: torch.Tensor | None, guidance: float,
                start: int, first: int, t: float = 0.0) -> None:
        """Append known latent frames (B, F, C, h, w), frames first.. of the video, to the cache at time t (0: clean),
        with their actions from the window's (B, n) (both guidance halves when guidance != 1)."""
        if clean.shape[1] == 0:
            return
        frames = clean.shape[1]
        act = None if window_actions is None else window_actions[:, first - start:first - start + frames]
        if act is not None and guidance != 1.0:
            clean, act = torch.cat([clean, clean]), torch.cat([act, torch.full_like(act, -1)])
        times = torch.full((clean.shape[0], frames), t, device=clean.device)
        self.transformer.commit(clean, times, cache, act)  # keys and values only: no velocity
