"""SiT's SDE sampler: Euler-Maruyama on a reverse-time SDE with the path's marginals, for video latents.

minisora.flow's convention (t = 1 noise, t = 0 data, one t per latent frame). For any w(t) >= 0 the SDE

    dx = (v(x, t) - w(t) q(x, t)) dt + sqrt(2 w(t)) dW,     integrated from t = 1 down to t = 0 (dt < 0)

has the marginals of the path at every t: q = grad log p_t is the score (minisora.interpolants converts the model's
prediction to v and q), the added drift -w q dt and the noise cancel in the Fokker-Planck equation, and w = 0 is
the flow ODE that euler_sample integrates. The noise corrects errors of the earlier steps; it costs no model call.

w(t), SiT's diffusion forms scaled by SDEConfig.norm (SiT's time t_S = 1 - t, rewritten in ours):

    constant                norm
    sbdm                    norm * D(t), D = s s' - (a'/a) s^2: score-based diffusion's own reverse SDE (vp: beta(t)/2);
                            infinite at t = 1 on linear and gvp, so those start at 1 - SAMPLE_EPS
    sigma                   norm * s(t)                      (SiT's default)
    linear                  norm * t
    decreasing              (1 - norm cos(pi t))^2 / 4       largest at noise, 0 at data for norm 1
    increasing-decreasing   norm * sin(pi t)^2               0 at both ends

The model is evaluated on euler_sample's grid (`steps` calls, the same times); every step but the last is an
Euler-Maruyama step, and the last one, into t = 0, adds no noise (SDEConfig.last_step; SiT's last_step with the
grid's last interval as its size, where SiT takes a fixed 0.04):

    mean      x + dt (v - w q)           the SDE's drift without its noise (SiT's default)
    tweedie   (x + s^2 q) / a            E[x0 | x_t], Tweedie's formula: the model's own estimate of the data
    euler     x + dt v                   the flow ODE's step

Context frames, context_t and the KV cache work as in euler_sample: held frames are put back after every step.
The noise dW is drawn from `generator` (B, T, C, H, W) per step, after the caller's own draws.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from minisora.configs import SDEConfig
from minisora.flow import held_context, time_grid
from minisora.interpolants import coefficients, convert, data_and_noise, drift_variance


def diffusion_coefficient(path: str, t: Tensor, cfg: SDEConfig) -> Tensor:
    """w(t) of `cfg.diffusion` (module docstring) at per-frame times t (B, T), shaped (B, T, 1, 1, 1), float32."""
    tt = t.float()[:, :, None, None, None]  # (B, T) -> (B, T, 1, 1, 1)
    form, norm = cfg.diffusion, cfg.norm
    if form == "constant":
        return torch.full_like(tt, norm)
    if form == "sbdm":
        return norm * drift_variance(coefficients(path, t))
    if form == "sigma":
        return norm * coefficients(path, t).s
    if form == "linear":
        return norm * tt
    if form == "decreasing":
        return 0.25 * (1 - norm * torch.cos(math.pi * tt)).square()
    return norm * torch.sin(math.pi * tt).square()  # increasing-decreasing


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws shaped like `like`, from `generator` on its own device, moved to `like`'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def last_step(x: Tensor, v: Tensor, t: Tensor, dt: Tensor, path: str, cfg: SDEConfig) -> Tensor:
    """The step from time t (B, T) to t + dt = 0 without noise, by cfg.last_step's rule (module docstring)."""
    if cfg.last_step == "euler":
        return x + dt * v
    if cfg.last_step == "tweedie":
        return data_and_noise("velocity", path, v, x, t)[0]  # = (x + s^2 q) / a
    score = convert(v, x, t, path, "velocity", "score")
    return x + dt * (v - diffusion_coefficient(path, t, cfg) * score)


def sde_sample(
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
    sde: SDEConfig = SDEConfig(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate the SDE (module docstring) from t = start (x = noise) to t = 0 on `time_grid(steps, shift, start)`:
    steps - 1 Euler-Maruyama steps, then `sde.last_step`. velocity_fn(x_t, t) -> v as in euler_sample; context
    frames (context_mask (B, T)) are held at their values (t = 0) or at noisy(context, noise, context_t, path)."""
    context, context_mask, keep = held_context("sde_sample", noise, context, context_mask, context_t, path)
    batch, frames = noise.shape[:2]
    grid = time_grid(steps, shift, device=noise.device, start=start)
    x = torch.where(keep, context, noise)
    for i in range(steps):
        t = torch.where(context_mask, context_t, grid[i].expand(batch, frames))  # (B, T)
        dt = (grid[i + 1] - grid[i]).to(x.dtype)
        v = velocity_fn(x, t)
        if i == steps - 1:
            x = last_step(x, v, t, dt, path, sde)
        else:
            w = diffusion_coefficient(path, t, sde)  # (B, T, 1, 1, 1)
            score = convert(v, x, t, path, "velocity", "score")
            x = x + dt * (v - w * score) + torch.sqrt(2 * w * -dt) * _randn(x, generator)
        x = torch.where(keep, context, x)  # held frames (their w, score may be inf at t = 0) are put back
    return x
