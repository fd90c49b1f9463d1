"""Flow-matching objective and ODE samplers for video latents, with one time per latent frame.

Convention (the diffusers FlowMatch one). Data x0, Gaussian noise e, time t in [0, 1], t = 1 is pure
noise. By default (FlowConfig.path = "linear", prediction = "velocity"):

    x_t = (1 - t) * x0 + t * e          the straight path from data (t=0) to noise (t=1)
    v   = d x_t / d t = e - x0          what the model predicts

SiT's other interpolants (gvp, vp: x_t = a(t) x0 + s(t) e) and predictions (noise, score, data), with their losses
and the conversions between them, are minisora.interpolants'; every function here takes `path` (and the loss
`prediction`). Sampling integrates dx = v dt from t = 1 down to t = 0 (Euler, Heun; minisora.sde adds SiT's
SDE), from the velocity the model's prediction converts to.

Latents are (B, T, C, H, W) and **every latent frame has its own t**, a (B, T) tensor (Diffusion
Forcing). Context frames get t = 0, so x_t equals x0 exactly there, and they are left out of the
loss; that is what lets one model do unconditional generation, continuation and long rollouts.

Context noise (GameNGen, Diffusion Forcing): with FlowConfig.context_noise = c > 0, training noises
each context frame to its own t ~ U(0, c) (still left out of the loss), so the model learns to
continue from slightly corrupted context, as it meets its own outputs in a rollout; at sampling,
`euler_sample(context_t=s)` holds the context at x_s = a(s) x0 + s(s) e (its e from `noise`) with t = s.
Both are 0 by default: clean context at t = 0 (FlowConfig, in minisora.configs; `minisora train`
noises context with c = 0.1: minisora.configs.train_recipe).

Teacher forcing (FlowConfig.teacher_forcing = share of steps, causal models): the model sees a clean
copy of the whole window before its noisy copy, and every noisy frame, at its own t, attends to the
clean frames before it (`VideoDiT(..., clean=x0)`). That is the chunk-1 rollout exactly, for every
frame of the window in one pass, where a prefix window trains it for one frame.

Pure tensors: no I/O, no logging, no distributed code, no host synchronisation in the loss.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minisora.configs import FlowConfig  # torch-free, so `minisora train --help` shows its defaults
from minisora.interpolants import interpolate, residual


def logit_normal(
    shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """Samples of sigmoid(N(mean, std^2)) shaped `shape`, in (0, 1) (SD3's logit-normal times)."""
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator, device=device))


def sample_times(
    batch: int, frames: int, cfg: FlowConfig, generator: torch.Generator | None = None, device=None
) -> tuple[Tensor, Tensor]:
    """Per-frame training times t (B, T) float32 and the context mask (B, T) bool (where t == 0, or
    t ~ U(0, cfg.context_noise) when that is > 0).

    Each sample picks one mode: full (one shared t), prefix (the first k frames are context, the rest
    share one t; with T == 1 there is no room for context and it falls back to full) or independent
    (a t per frame). No host synchronisation.
    """
    u = torch.rand(batch, generator=generator, device=device)  # (B,) picks the mode
    is_prefix = (u >= cfg.p_full) & (u < cfg.p_full + cfg.p_prefix)
    is_independent = u >= cfg.p_full + cfg.p_prefix

    t_shared = logit_normal((batch, 1), cfg.logit_mean, cfg.logit_std, generator, device)  # (B, 1)
    t_frame = logit_normal((batch, frames), cfg.logit_mean, cfg.logit_std, generator, device)  # (B, T)
    t = torch.where(is_independent[:, None], t_frame, t_shared.expand(batch, frames))

    # prefix length k uniform in [1, k_max]; k_max = 0 (no context) when T == 1
    k_max = min(frames - 1, cfg.max_context if cfg.max_context is not None else frames - 1)
    k = torch.floor(torch.rand(batch, generator=generator, device=device) * k_max).long() + 1  # (B,)
    k = torch.where(is_prefix & (k_max > 0), k, torch.zeros_like(k))
    context = torch.arange(frames, device=t.device)[None, :] < k[:, None]  # (B, T)
    if cfg.context_noise > 0:  # drawn only when used: clean context consumes no random numbers here
        t_ctx = cfg.context_noise * torch.rand(batch, frames, generator=generator, device=device)
    else:
        t_ctx = torch.zeros_like(t)
    t = torch.where(context, t_ctx, t)
    return t, context


def teacher_forcing_times(
    batch: int, frames: int, cfg: FlowConfig, generator: torch.Generator | None = None, device=None
) -> tuple[Tensor, Tensor]:
    """Times of a teacher-forcing step: t (B, T) of the noisy frames, each its own logit-normal draw (all in
    the loss), and t_clean (B, T) of the clean copy they see as context: 0, or U(0, cfg.context_noise)."""
    t = logit_normal((batch, frames), cfg.logit_mean, cfg.logit_std, generator, device)
    if cfg.context_noise > 0:
        return t, cfg.context_noise * torch.rand(batch, frames, generator=generator, device=device)
    return t, torch.zeros_like(t)


def _check_latents(name: str, x: Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be (B, T, C, H, W) latents, got shape {tuple(x.shape)}")


def noisy(x0: Tensor, noise: Tensor, t: Tensor, path: str = "linear") -> Tensor:
    """x_t = a(t) x0 + s(t) e of `path` ((1 - t) x0 + t e on linear) with t (B, T) broadcast over (C, H, W);
    frames with t = 0 return x0 exactly."""
    _check_latents("x0", x0)
    if noise.shape != x0.shape or t.shape != x0.shape[:2]:
        raise ValueError(f"noisy: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and t {tuple(t.shape)} disagree")
    return interpolate(path, x0, noise, t)


def flow_loss(output: Tensor, x0: Tensor, noise: Tensor, context: Tensor | None = None, t: Tensor | None = None,
              path: str = "linear", prediction: str = "velocity") -> Tensor:
    """Mean squared error of the model's `output` against its target (e - x0 for the linear path's velocity; the
    other paths and predictions need the times t (B, T): minisora.interpolants states each loss and weighting),
    averaged over non-context frames (each frame weighs the same), computed in float32. Context frames contribute
    nothing, whatever the model predicted there (even inf/nan), nor any gradient. A scalar; 0 if every frame is
    context. No host synchronisation."""
    _check_latents("output", output)
    if output.shape != x0.shape or noise.shape != x0.shape:
        raise ValueError(
            f"flow_loss: output {tuple(output.shape)}, x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} differ"
        )
    if t is None and (path, prediction) != ("linear", "velocity"):
        raise ValueError(f"flow_loss: the {path} path's {prediction} loss needs the times t (B, T)")
    err = residual(prediction, path, output.float(), x0.float(), noise.float(), t)  # (B, T, C, H, W)
    if context is None:
        return err.square().mean(dim=(2, 3, 4)).mean()
    if context.shape != err.shape[:2]:
        raise ValueError(f"flow_loss: context mask {tuple(context.shape)} must be (B, T) = {tuple(err.shape[:2])}")
    err = torch.where(context[:, :, None, None, None], torch.zeros_like(err), err)  # before squaring: no nan grads
    per_frame = err.square().mean(dim=(2, 3, 4))  # (B, T)
    return per_frame.sum() / (~context).sum().clamp_min(1)


def time_grid(steps: int, shift: float = 1.0, device=None, start: float = 1.0) -> Tensor:
    """The `steps + 1` sampling times from `start` (1) to 0, float32: start * t' with t' = shift t / (1 + (shift - 1) t)
    of a uniform grid t from 1 to 0.

    shift > 1 moves every interior time towards 1, so more of the steps are spent at high noise (where
    the coarse layout is decided) and the last steps near t = 0 are longer; shift = 1 is uniform. start < 1
    (minisora.interpolants.sample_start) keeps the model away from t = 1 where a prediction cannot give the velocity.
    """
    if steps < 1:
        raise ValueError(f"time_grid needs steps >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"time_grid needs shift > 0, got {shift}")
    if not 0 < start <= 1:
        raise ValueError(f"time_grid needs start in (0, 1], got {start}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return (start * (shift * t / (1 + (shift - 1) * t))).float()


def held_context(
    name: str, noise: Tensor, context: Tensor | None, context_mask: Tensor | None, context_t: float, path: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Check a sampler's arguments; (context values to hold (B, T, C, H, W), context_mask (B, T), \
keep (B, T, 1, 1, 1))."""
    _check_latents("noise", noise)
    if (context is None) != (context_mask is None):
        raise ValueError(f"{name}: give both context and context_mask, or neither")
    batch, frames = noise.shape[:2]
    if context_mask is None:
        context_mask = torch.zeros(batch, frames, dtype=torch.bool, device=noise.device)
        context = noise
    elif context.shape != noise.shape or context_mask.shape != (batch, frames):
        raise ValueError(
            f"{name}: context {tuple(context.shape)} must match noise {tuple(noise.shape)} "
            f"and context_mask {tuple(context_mask.shape)} must be (B, T) = {(batch, frames)}"
        )
    if not 0.0 <= context_t < 1.0:
        raise ValueError(f"{name}: context_t must be in [0, 1), got {context_t}")
    if context_t > 0:
        context = noisy(context, noise, torch.full((batch, frames), context_t, device=noise.device), path)
    return context, context_mask, context_mask[:, :, None, None, None]


def euler_sample(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    steps: int,
    shift: float = 1.0,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
    context_t: float = 0.0,
    *,
    path: str = "linear",
    start: float = 1.0,
) -> Tensor:
    """Integrate dx = v dt from t = start (x = noise) to t = 0 with Euler steps on `time_grid(steps, shift, start)`.

    velocity_fn(x_t (B, T, C, H, W), t (B, T)) -> v. Frames where context_mask (B, T) is True are held
    exactly at their clean values from `context` (B, T, C, H, W), with t = 0, at every step; with
    context_t = s > 0 they are held at noisy(context, noise, s, path) with t = s instead.
    """
    context, context_mask, keep = held_context("euler_sample", noise, context, context_mask, context_t, path)
    batch, frames = noise.shape[:2]
    grid = time_grid(steps, shift, device=noise.device, start=start)
    x = torch.where(keep, context, noise)
    for i in range(steps):
        t = torch.where(context_mask, context_t, grid[i].expand(batch, frames))  # (B, T)
        v = velocity_fn(x, t)
        x = x + (grid[i + 1] - grid[i]).to(x.dtype) * v
        x = torch.where(keep, context, x)
    return x


def heun_sample(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    steps: int,
    shift: float = 1.0,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
    context_t: float = 0.0,
    *,
    path: str = "linear",
    start: float = 1.0,
) -> Tensor:
    """As `euler_sample`, with Heun's second-order steps (EDM): an Euler step to the next time, then
    the average of the velocities at both ends; the last step, to t = 0, stays Euler. It costs
    2 * steps - 1 model calls, so Heun with n steps compares with Euler at 2n - 1 steps.
    """
    context, context_mask, keep = held_context("heun_sample", noise, context, context_mask, context_t, path)
    batch, frames = noise.shape[:2]
    grid = time_grid(steps, shift, device=noise.device, start=start)
    x = torch.where(keep, context, noise)
    for i in range(steps):
        t = torch.where(context_mask, context_t, grid[i].expand(batch, frames))  # (B, T)
        dt = (grid[i + 1] - grid[i]).to(x.dtype)
        v = velocity_fn(x, t)
        x_next = torch.where(keep, context, x + dt * v)
        if i < steps - 1:
            t_next = torch.where(context_mask, context_t, grid[i + 1].expand(batch, frames))
            x_next = torch.where(keep, context, x + dt * 0.5 * (v + velocity_fn(x_next, t_next)))
        x = x_next
    return x
