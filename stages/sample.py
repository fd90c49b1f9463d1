"""`minisora sample`: load a trained pipeline, generate / continue / roll out videos, write mp4/gif/npz.

--checkpoint: a run directory (its newest checkpoint), a checkpoint directory (its `pipeline/`), a
training `pipeline/` directory, or a full DiTPipeline saved with `save_pretrained`
(DiTPipeline.from_run; the format is minisora.run_dir's).
--context: a TECO clip file (`.npz` DMLab, `.mp4` Minecraft) or a store reference `STORE:SPLIT:INDEX`
(minisora.context).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minisora.configs import SampleConfig  # noqa: F401 (re-exported: stages.sample.SampleConfig)
from minisora.context import load_actions, load_context, mark_context, side_by_side
from minisora.dist import resolve_device
from minisora.errors import MinisoraError, check_writable
from minisora.pipeline import DiTPipeline
from minisora.run_dir import precision_dtype
from minisora.video import write_gif, write_mp4


class SampleError(MinisoraError, RuntimeError):
    """An option that sampling cannot use; the message names it. (A run directory or context that cannot be
    loaded raises minisora.run_dir.RunDirError or minisora.context.ContextError.)"""


# ------------------------------------------------------------------------------ output
def write_video(path: Path, frames: np.ndarray, formats, fps: float,
                arrays: dict[str, np.ndarray] | None = None) -> list[str]:
    """PATH.mp4 / PATH.gif of uint8 (T, H, W, 3) frames, and PATH.npz with `frames` plus `arrays`."""
    written = []
    for fmt in formats:
        p = path.with_name(f"{path.name}.{fmt}")
        if fmt == "mp4":
            write_mp4(p, frames, fps=max(1, round(fps)))
        elif fmt == "gif":
            write_gif(p, frames, fps=fps)
        elif fmt == "npz":
            p.parent.mkdir(parents=True, exist_ok=True)
            np.savez(p, frames=frames, **(arrays or {}))
        written.append(str(p))
    return written


# ------------------------------------------------------------------------------ main
def main(cfg: SampleConfig) -> dict:
    device = resolve_device(cfg.device)
    pipe = DiTPipeline.from_run(cfg.checkpoint, device, precision_dtype(cfg.precision, device))
    pipe.transformer.set_attention_kernel(cfg.attention_kernel)
    pipe.check_guidance(cfg.guidance)  # before the context is loaded and encoded
    total = cfg.frames or pipe.config.window_frames
    if cfg.context and total <= cfg.context_frames:
        raise SampleError(f"--frames {total}{'' if cfg.frames else ' (the training window)'} must exceed "
                          f"--context-frames {cfg.context_frames}")
    check_writable(cfg.out, file=False)  # OUT is a stem: OUT.mp4, OUT-vs-truth.gif, ...
    ctx = load_context(pipe, cfg.context, cfg.context_frames) if cfg.context else None
    actions = load_actions(cfg.actions, ctx, total, cfg.num_videos)
    gen = torch.Generator().manual_seed(cfg.seed)
    ctx_latents = None if ctx is None else ctx.latents.repeat(cfg.num_videos, 1, 1, 1, 1)  # (videos, K, C, h, w)
    out = pipe(batch_size=cfg.num_videos, num_inference_steps=cfg.steps, num_frames=total, context_latents=ctx_latents,
               actions=actions, guidance=cfg.guidance, shift=cfg.shift, chunk=cfg.chunk, generator=gen,
               kv_cache=cfg.kv_cache, context_t=cfg.context_noise, sampler=cfg.sampler, sde=cfg.sde,
               compile=cfg.compile)
    fps = cfg.fps or pipe.config.fps or 10
    out_path = Path(cfg.out)
    stem = out_path.with_suffix("") if out_path.suffix in (".mp4", ".gif", ".npz") else out_path
    written = []
    ctx_pix = 0 if ctx is None else pipe.video_vae.pixel_frames(cfg.context_frames)
    videos_fmt = [f for f in cfg.formats if f != "npz"]
    for i, frames in enumerate(out.frames):
        name = stem.with_name(f"{stem.name}-{i:02d}") if len(out.frames) > 1 else stem
        written += write_video(name, mark_context(frames, ctx_pix) if ctx_pix else frames, videos_fmt, fps)
        if "npz" in cfg.formats:  # the data, unmarked: decoded frames and normalised latents (context included)
            written += write_video(name, frames, ["npz"], fps, {"latents": out.latents[i].cpu().numpy(),
                                                                "context_frames": np.array(ctx_pix),
                                                                "context_latent_frames": np.array(out.context_frames)})
        if ctx is not None and ctx.truth is not None:
            written += write_video(name.with_name(name.name + "-vs-truth"), side_by_side(ctx.truth, frames, ctx_pix),
                                   videos_fmt, fps)
    return {"written": written, "frames": int(out.frames.shape[1]), "latent_frames": total, "videos": len(out.frames),
            "rollout": pipe.rollout_line(out.kv_cache, cfg.compile)}

