"""The checks of DiTPipeline's inputs (minisora.pipeline), each with the message a user needs.

Pure functions of what they check and the pipeline's parts, so that the pipeline itself keeps only its
rollouts. The rollout mode lives here too: which KV cache mode ("rolling", "window", "off") a call
asks for, given the transformer and whether known frames are shown noised.
"""

from __future__ import annotations

import numpy as np
import torch


def kv_cache_mode(tcfg, kv_cache: str = "auto", context_t: float = 0.0) -> str:
    """The rollout mode for `kv_cache` ("auto", "rolling", "window", "off"), the transformer config `tcfg` and the
    noise level context_t at which known frames are shown.

    "auto" is "rolling" for a causal transformer with clean known frames, "window" when they are shown noised
    (context_t > 0: each window shows its known frames noised with that window's own noise draws, as the window
    recompute does; the window cache commits them so, once per window), and "off" for other transformers.
    """
    causal = tcfg.get("attention", "full") == "causal"
    if kv_cache == "auto":
        if not causal or tcfg.patch_size_t != 1:
            return "off"
        return "window" if context_t > 0 else "rolling"
    if kv_cache not in ("rolling", "window", "off"):
        raise ValueError(f"kv_cache must be auto, rolling, window or off, got {kv_cache!r}")
    if kv_cache != "off" and not causal:
        raise ValueError(f"kv_cache={kv_cache!r} needs a causal transformer; this one has "
                         f"attention={tcfg.get('attention', 'full')!r} (use kv_cache='off')")
    if kv_cache != "off" and tcfg.patch_size_t != 1:
        raise ValueError(f"the KV cache caches whole latent frames; patch_size_t {tcfg.patch_size_t} must be 1")
    if kv_cache == "rolling" and context_t > 0:
        raise ValueError(f"context_t={context_t} (--context-noise) shows every window's known frames noised with that "
                         "window's draws, but the rolling cache keeps each frame once; use kv_cache='window' "
                         "(--kv-cache window: the same rollout as the recompute) or 'off' (--no-kv-cache)")
    return kv_cache


def compile_rollout(pipe, mode: str, chunk: int) -> None:
    """Compile pipe's transformer for a rollout in `mode` with `chunk` (VideoDiT.compile_rollout), or refuse where the
    compiled passes would never run: they are a plain causal model's frame-by-frame rolling KV cache in its steady
    state (minisora.kv_cache.KVRing)."""
    tcfg, retrieve = pipe.transformer.config, pipe.config.get("retrieve_frames", 0)
    if mode != "rolling" or chunk != 1 or tcfg.get("short_frames", 0) or retrieve:
        raise ValueError(f"compile compiles a causal model's frame-by-frame rolling KV cache (chunk 1, no long-short "
                         f"memory, no retrieval); this rollout has kv_cache {mode!r}, chunk {chunk}, short_frames "
                         f"{tcfg.get('short_frames', 0)}, retrieve_frames {retrieve}")
    pipe.transformer.compile_rollout()


def context_latents(pipe, latents: torch.Tensor | None,
                    frames: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    """The context as normalised float32 latents (B, K, C, h, w) on `pipe`'s device, or None: `latents`, or
    uint8 pixel `frames` (B, T, H, W, 3) that the pipeline's VAE encodes."""
    if frames is not None:
        latents = pipe.encode_frames(frames)
    if latents is None:
        return None
    ctx = latents.to(pipe.device, torch.float32)
    channels = pipe.transformer.config.in_channels
    if ctx.ndim != 5 or ctx.shape[2] != channels:
        raise ValueError(f"context latents must be (B, K, {channels}, h, w), got {tuple(ctx.shape)}")
    return ctx


def latent_size(pipe, height: int | None, width: int | None, ctx: torch.Tensor | None) -> tuple[int, int]:
    """Latent (h, w) for frames of height x width pixels (None: the context's, else the training size)."""
    h, w = (int(s) for s in (ctx.shape[-2:] if ctx is not None else pipe.config.latent_size))
    sc, patch = pipe.video_vae.info.spatial_compression, pipe.transformer.config.patch_size
    for name, pixels in (("height", height), ("width", width)):
        if pixels is not None and (pixels <= 0 or pixels % (sc * patch)):
            raise ValueError(f"{name} {pixels} must be a positive multiple of {sc * patch}: the VAE compresses "
                             f"{sc}x and the transformer's patches are {patch}x{patch} latent pixels")
    size = (h if height is None else height // sc, w if width is None else width // sc)
    if ctx is not None and size != (h, w):
        raise ValueError(f"height x width {size[0] * sc}x{size[1] * sc} does not fit the context: its latents "
                         f"are {h}x{w}, frames of {h * sc}x{w * sc} pixels")
    return size


def check_actions(actions: np.ndarray | torch.Tensor, num_actions: int, batch: int, total: int,
                  device: torch.device) -> torch.Tensor:
    """(videos, latent frames) integer actions in [0, num_actions), or -1 for the null action, as a long tensor
    on `device`."""
    if num_actions == 0:
        raise ValueError("this model was trained without actions; pass no actions")
    actions = torch.as_tensor(np.asarray(actions) if not torch.is_tensor(actions) else actions)
    if actions.dtype.is_floating_point or actions.shape != (batch, total):
        raise ValueError(f"actions {actions.dtype} {tuple(actions.shape)} must be integers shaped "
                         f"(videos, latent frames) = {(batch, total)}")
    if actions.numel() and (actions.min() < -1 or actions.max() >= num_actions):
        raise ValueError(f"actions must be in [0, {num_actions}) (or -1 for none); got values "
                         f"{int(actions.min())}..{int(actions.max())}")
    return actions.to(device).long()
