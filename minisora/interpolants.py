"""Interpolants (SiT, Ma et al. 2024): the path from data to noise, what the network predicts, and the conversions.

minisora.flow's convention: data x0, Gaussian noise e, t = 1 is noise, t = 0 is data, one t per latent frame
(B, T). Every path is

    x_t = a(t) x0 + s(t) e,   a(0) = 1, s(0) = 0,   velocity v = d x_t / d t = a'(t) x0 + s'(t) e

    linear  a = 1 - t            s = t                  the straight path of rectified flow (minisora's default)
    gvp     a = cos(pi t / 2)    s = sin(pi t / 2)      SiT's GVP: a^2 + s^2 = 1, variance preserving
    vp      a = exp(-t^2 (b1 - b0) / 4 - t b0 / 2)      SiT's VP: the linear-beta VP SDE of DDPM / score SDEs,
            s = sqrt(1 - a^2), b0 = 0.1, b1 = 20        beta(t) = b0 + t (b1 - b0); a(1) = 0.0066, not 0

What the network predicts, and its loss (SiT's weighting "none"; the loss is a mean over the frame's elements):

    velocity  v = a' x0 + s' e        |v_hat - v|^2         (linear: e - x0, the rectified-flow loss)
    noise     e                       |e_hat - e|^2         (DDPM's "simple" loss)
    score     q = -e / s              |s q_hat + e|^2 = s^2 |q_hat - q|^2   (denoising score matching, lambda = s^2)
    data      x0                      |x0_hat - x0|^2       (x0-prediction; on linear the velocity loss weighted by t^2)

q is the score of x_t given x0; its mean over x0 given x_t is the score of p_t. From any one prediction and x_t,
both x0 and e follow (two equations, two unknowns), and from them every other prediction:

    noise e      x0 = (x - s e) / a
    score q      e = -s q, then as noise
    data x0      e = (x - a x0) / s
    velocity v   x0 = (s' x - s v) / (a s' - s a'),  e = (a v - a' x) / (a s' - s a')

x0 is lost where a = 0 (noise or score at t = 1 on linear and gvp), and e and the score where s = 0 (t = 0; a data
prediction's e is set to 0 there, a frame held clean, whose velocity no sampler uses): the samplers start at
1 - SAMPLE_EPS where it matters (`sample_start`, SiT's sample_eps) and never evaluate the model at t = 0 for a
frame they integrate (the last step of a grid ends there).

The conversions are affine in the prediction for a given (x, t), so classifier-free guidance on any of them
equals guidance on the velocity. Pure tensors; float32 unless given float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from minisora.configs import PATHS, PREDICTIONS

VP_BETA = (0.1, 20.0)  # SiT's VPCPlan (beta_min, beta_max)
SAMPLE_EPS = 1e-3  # SiT's sample_eps: how far below t = 1 sampling starts where t = 1 is singular


class Coefficients(NamedTuple):
    """a(t), s(t) and their time derivatives, each (B, T, 1, 1, 1) to broadcast over latents (B, T, C, H, W)."""

    a: Tensor
    s: Tensor
    da: Tensor
    ds: Tensor


def check_path(path: str, prediction: str = "velocity") -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")


def coefficients(path: str, t: Tensor, dtype: torch.dtype = torch.float32) -> Coefficients:
    """The path's a, s, a', s' at per-frame times t (B, T), shaped (B, T, 1, 1, 1) in `dtype`."""
    check_path(path)
    t = t.to(dtype)[:, :, None, None, None]  # (B, T) -> (B, T, 1, 1, 1)
    if path == "linear":
        return Coefficients(1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t))
    if path == "gvp":
        h = math.pi / 2
        a, s = torch.cos(h * t), torch.sin(h * t)
        return Coefficients(a, s, -h * s, h * a)
    b0, b1 = VP_BETA
    log_a = -0.25 * t.square() * (b1 - b0) - 0.5 * t * b0
    a = torch.exp(log_a)
    s = torch.sqrt(-torch.expm1(2 * log_a))  # sqrt(1 - a^2), accurate near t = 0
    da = -0.5 * (b0 + t * (b1 - b0)) * a  # a' = -beta(t) a / 2
    return Coefficients(a, s, da, -a * da / s)  # s s' = -a a' (a^2 + s^2 = 1); s' is infinite at t = 0


def interpolate(path: str, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = a(t) x0 + s(t) e, in x0's dtype; frames with t = 0 return x0 exactly (a = 1, s = 0 on every path)."""
    c = coefficients(path, t, x0.dtype)
    return c.a * x0 + c.s * noise


def drift_variance(c: Coefficients) -> Tensor:
    """D(t) = s s' - (a'/a) s^2, so that v = (a'/a) x - D q: the SDE sampler's score weight (SiT's drift_var;
    g(t)^2 / 2 of the diffusion SDE whose probability flow is the path: beta(t) / 2 on vp, t / (1 - t) on linear)."""
    return c.s * c.ds - c.da / c.a * c.s.square()


def target(prediction: str, path: str, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the network should output at x_t: the velocity a' x0 + s' e, the noise e, the score -e / s, or x0."""
    check_path(path, prediction)
    if prediction == "noise":
        return noise
    if prediction == "data":
        return x0
    if prediction == "velocity" and path == "linear":
        return noise - x0  # bit for bit the rectified-flow target
    c = coefficients(path, t, x0.dtype)
    return c.da * x0 + c.ds * noise if prediction == "velocity" else -noise / c.s


def residual(prediction: str, path: str, output: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The error whose square is the loss (module docstring): output - target, or s q_hat + e for the score."""
    if prediction != "score":
        return output - target(prediction, path, x0, noise, t)
    check_path(path, prediction)
    return coefficients(path, t, output.dtype).s * output + noise


def data_and_noise(prediction: str, path: str, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The x0 and e that the network's `output` (a `prediction`) implies at x_t = x, time t (B, T)."""
    check_path(path, prediction)
    c = coefficients(path, t, output.dtype)
    if prediction == "velocity":
        det = c.a * c.ds - c.s * c.da
        return (c.ds * x - c.s * output) / det, (c.a * output - c.da * x) / det
    if prediction == "data":  # e where s > 0; 0 at t = 0, where x_t = x0 says nothing of e
        return output, torch.where(c.s > 0, (x - c.a * output) / c.s.clamp_min(1e-12), torch.zeros_like(output))
    e = output if prediction == "noise" else -c.s * output
    return (x - c.s * e) / c.a, e


def convert(output: Tensor, x: Tensor, t: Tensor, path: str, source: str, dest: str) -> Tensor:
    """The network's `output`, a `source` prediction at x_t = x and time t (B, T), as a `dest` prediction."""
    check_path(path, dest)
    if source == dest:
        check_path(path, source)
        return output
    x0, e = data_and_noise(source, path, output, x, t)
    if dest == "noise":
        return e
    if dest == "data":
        return x0
    c = coefficients(path, t, output.dtype)
    return c.da * x0 + c.ds * e if dest == "velocity" else -e / c.s


def sample_start(path: str, prediction: str, sde_diffusion: str | None = None) -> float:
    """The first time of a sampling grid: 1 - SAMPLE_EPS where t = 1 is singular, else 1 (SiT's check_interval).

    On linear and gvp, a(1) = 0: a noise or score prediction says nothing about x0 there, and the sbdm
    diffusion D(t) is infinite; a velocity or data prediction gives both x0 and e at t = 1. vp's a(1) = 0.0066 is
    small but not 0: it starts at 1, as in SiT.
    """
    check_path(path, prediction)
    singular = prediction in ("noise", "score") or sde_diffusion == "sbdm"
    return 1.0 - SAMPLE_EPS if path != "vp" and singular else 1.0
