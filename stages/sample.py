"""`minisora sample`: load a trained pipeline, generate / continue / roll out videos, write mp4/gif/npz.

Checkpoint resolution: a run directory (its newest checkpoint), a checkpoint directory (its
`pipeline/`), a training `pipeline/` directory (transformer + minisora_pipeline.json naming the
VAE), or a full DiTPipeline saved with `save_pretrained` (model_index.json).
Context sources: a TECO clip file (`.npz` DMLab, `.mp4` Minecraft) or a store reference
`STORE:SPLIT:INDEX` (latents straight from the store, ground truth from the store's source clip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minisora.checkpoint import list_checkpoints
from minisora.data.clips import read_clip
from minisora.dist import resolve_device
from minisora.errors import MinisoraError, check_writable
from minisora.pipeline import DiTPipeline
from minisora.store import LatentStore
from minisora.store_guard import check_vae
from minisora.video import write_gif, write_mp4


@dataclass
class SampleConfig:
    checkpoint: str
    out: str
    num_videos: int = 1
    frames: int | None = None  # latent frames in all (context included); None: the training window
    steps: int = 20
    shift: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # the transformer's dtype: minisora.hardware.resolve_precision
    context: str | None = None  # clip file or STORE:SPLIT:INDEX
    context_frames: int = 4  # latent frames of context
    actions: str | None = None  # "context" (the context clip's own), a .npz/.npy file, or None
    guidance: float = 1.0
    formats: tuple[str, ...] = ("mp4", "gif")  # and/or "npz": unmarked frames + latents per video
    chunk: int = 1  # new latent frames per rollout window
    fps: float | None = None
    kv_cache: str = "auto"  # auto | rolling | window | off (see minisora.pipeline; full-attention models: off)
    attention_kernel: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex (minisora.attention)


class SampleError(MinisoraError, RuntimeError):
    """A checkpoint, context or option that sampling cannot use; the message names it."""


# ------------------------------------------------------------------------------ loading
def resolve_pipeline_dir(path: str | Path) -> Path:
    path = Path(path)
    if (path / "model_index.json").exists() or (path / "minisora_pipeline.json").exists():
        return path
    if (path / "pipeline").is_dir():
        return path / "pipeline"
    ckpts = list_checkpoints(path)  # complete step-* only: never a .tmp or an abandoned branch
    if ckpts:
        return ckpts[-1] / "pipeline"
    raise SampleError(f"{path}: not a run, checkpoint or pipeline directory (no checkpoints/, pipeline/, "
                      "model_index.json or minisora_pipeline.json)")


def load_pipeline(path: str | Path, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> DiTPipeline:
    """DiTPipeline from any of the directory kinds above, on `device`.

    The transformer runs in `dtype` (default: sampling_dtype(device), bf16 on CUDA); the VAE and
    the Euler integration stay float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from minisora.model import VideoDiT
    from minisora.vae import VideoVAE

    pdir = resolve_pipeline_dir(path)
    if (pdir / "model_index.json").exists():
        pipe = DiTPipeline.from_pretrained(str(pdir)).to(device)
    else:
        meta = json.loads((pdir / "minisora_pipeline.json").read_text())
        v = meta["vae"]
        vae = VideoVAE.load(v["source"], subfolder=v.get("subfolder"), revision=v.get("revision"), device=device)
        if v.get("weights_sha256") not in (None, vae.info.weights_sha256):
            raise SampleError(f"{pdir}: the model was trained on latents of VAE weights {v['weights_sha256'][:16]}, "
                              f"but {v['source']} now holds weights {vae.info.weights_sha256[:16]}; "
                              "restore that VAE there")
        transformer = VideoDiT.from_pretrained(str(pdir / "transformer"))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=meta.get("scheduler", {}).get("shift", 1.0))
        pipe = DiTPipeline(transformer, vae.model, scheduler, **pipeline_kwargs(meta)).to(device)
    dtype = dtype or sampling_dtype(torch.device(device))
    if pipe.transformer.dtype != dtype:
        pipe.transformer.to(dtype)
    return pipe


def pipeline_kwargs(meta: dict) -> dict:
    """DiTPipeline's config values from a training pipeline description."""
    src = meta.get("source", {})
    return {"latents_mean": meta["latent_stats"]["mean"], "latents_std": meta["latent_stats"]["std"],
            "window_frames": meta["frames"], "latent_size": meta["latent_size"], "fps": src.get("fps"),
            "frame_stride": src.get("frame_stride", 1), "resolution": src.get("resolution")}


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The transformer's dtype for `--precision` on `device` (the hardware rule); prints the choice once."""
    from minisora.hardware import resolve_precision

    choice = resolve_precision(precision, device)
    print(f"sampling {choice.line()}", flush=True)
    return choice.autocast_dtype or torch.float32


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The transformer's dtype when sampling: bf16 on CUDA GPUs that support it, float32 otherwise."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ------------------------------------------------------------------------------ context
@dataclass
class Context:
    latents: torch.Tensor  # (1, K, C, h, w) normalised
    truth: np.ndarray | None  # uint8 (T, H, W, 3) ground-truth frames at the pipeline's stride and size
    actions: np.ndarray | None  # (T',) per latent frame
    name: str


def _kind_of(path: Path) -> str:
    kind = {".npz": "dmlab", ".mp4": "minecraft"}.get(path.suffix.lower())
    if kind is None:
        raise SampleError(f"{path}: context clips must be .npz (DMLab) or .mp4 (Minecraft)")
    return kind


def clip_frames(pipe: DiTPipeline, path: Path, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A source clip's frames and actions at the pipeline's frame stride and resolution."""
    frames, actions = read_clip(path, kind)
    s = pipe.config.frame_stride
    frames = frames[::s]
    actions = None if actions is None else actions[::s]
    res = pipe.config.resolution
    if res and tuple(frames.shape[1:3]) != tuple(res):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        x = F.interpolate(x, size=tuple(res), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return frames, actions


def load_context(pipe: DiTPipeline, source: str, k: int) -> Context:
    """Context latents (first k latent frames), ground truth and actions from a clip or a store."""
    parts = source.rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit() and not Path(source).exists():
        url, split, idx = parts[0], parts[1], int(parts[2])
        store = LatentStore(url)
        store.require_complete()  # latent statistics exist only once every shard is in
        check_vae(store.attrs.get("vae"), pipe.video_vae.identity(), source,
                  f"the pipeline's VAE ({pipe.video_vae.info.source})")
        lay = store.layout(split)
        if not 0 <= idx < lay.clips:
            raise SampleError(f"{source}: index {idx} out of range, {split} has {lay.clips} clips")
        n = int(store.read(split, "length", idx))
        if n < k:
            raise SampleError(f"{source}: clip has {n} latent frames < {k} context frames")
        channels = pipe.transformer.config.in_channels
        if lay.channels != channels:
            raise SampleError(f"{source}: the store has {lay.channels} latent channels, the model {channels}")
        mean = torch.from_numpy(store.read(split, "mean", (idx, slice(0, k))).astype(np.float32))[None]
        actions = store.read(split, "actions", (idx, slice(0, n))).astype(np.int64)
        manifest = store.manifest_json()
        clip = [c for c in manifest["clips"] if c["split"] == split][idx]
        path = Path(manifest["root"]) / clip["path"]
        truth = clip_frames(pipe, path, manifest["kind"])[0] if path.exists() else None
        return Context(pipe.normalize_latents(mean), truth, actions if (actions >= 0).all() else None, f"{split}-{idx}")
    path = Path(source)
    if not path.exists():
        raise SampleError(f"context {source}: no such file, and not a STORE:SPLIT:INDEX reference")
    frames, actions = clip_frames(pipe, path, _kind_of(path))
    pix = pipe.video_vae.pixel_frames(k)
    if len(frames) < pix:
        raise SampleError(f"{path}: {len(frames)} frames < {pix} needed for {k} context latent frames")
    latents = pipe.encode_frames(frames[None, :pix])
    lat_actions = None
    if actions is not None:  # one per latent frame, as the encode stage stores them
        lat_actions = pipe.video_vae.latent_actions(actions, pipe.video_vae.latent_frames(len(frames)))
    return Context(latents, frames, lat_actions, path.stem)


def load_actions(spec: str | None, ctx: Context | None, total: int, videos: int) -> torch.Tensor | None:
    """(videos, total) actions, one per latent frame: the context clip's ("context"), a file's, or None.

    A file is a .npy array or a .npz with an `actions` array, (T,) ints read as per latent frame.
    """
    if spec is None or spec == "none":
        return None
    if spec == "context":
        if ctx is None or ctx.actions is None:
            raise SampleError("--actions context needs a --context clip that has recorded actions")
        acts = ctx.actions
    else:
        acts = _read_actions_file(Path(spec))
    acts = np.asarray(acts, dtype=np.int64)
    if len(acts) < total:
        raise SampleError(f"{spec}: {len(acts)} actions < {total} latent frames to generate")
    return torch.from_numpy(acts[:total])[None].repeat(videos, 1)


def _read_actions_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SampleError(f"--actions {path}: no such file (use 'context', a .npy file or a .npz with `actions`)")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "actions" not in loaded.files:
                raise SampleError(f"{path}: no `actions` array (has: {', '.join(loaded.files) or 'nothing'})")
            acts = loaded["actions"]
    else:
        acts = loaded
    if acts.ndim != 1 or not np.issubdtype(acts.dtype, np.integer):
        raise SampleError(f"{path}: actions must be a 1-D integer array, got {acts.dtype} {acts.shape}")
    return acts


# ------------------------------------------------------------------------------ output
def mark_context(frames: np.ndarray, n: int, color=(255, 0, 0), width: int = 2) -> np.ndarray:
    """Draw a coloured border on the first n frames (the given context)."""
    out = frames.copy()
    out[:n, :width], out[:n, -width:], out[:n, :, :width], out[:n, :, -width:] = color, color, color, color
    return out


def side_by_side(truth: np.ndarray, generated: np.ndarray, context_pixels: int) -> np.ndarray:
    t = min(len(truth), len(generated))
    gap = np.full((t, generated.shape[1], 4, 3), 255, np.uint8)
    return np.concatenate([mark_context(truth[:t], context_pixels), gap, mark_context(generated[:t], context_pixels)],
                          axis=2)


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
    pipe = load_pipeline(cfg.checkpoint, device, precision_dtype(cfg.precision, device))
    pipe.transformer.set_attention_kernel(cfg.attention_kernel)
    total = cfg.frames or pipe.config.window_frames
    if cfg.context and total <= cfg.context_frames:
        raise SampleError(f"--frames {total}{'' if cfg.frames else ' (the training window)'} must exceed "
                          f"--context-frames {cfg.context_frames}")
    check_writable(cfg.out, file=False)  # OUT is a stem: OUT.mp4, OUT-vs-truth.gif, ...
    ctx = load_context(pipe, cfg.context, cfg.context_frames) if cfg.context else None
    actions = load_actions(cfg.actions, ctx, total, cfg.num_videos)
    gen = torch.Generator().manual_seed(cfg.seed)
    ctx_latents = None if ctx is None else ctx.latents.repeat(cfg.num_videos, 1, 1, 1, 1)  # (videos, K, C, h, w)
    out = pipe(num_videos=cfg.num_videos, num_frames=total, context_latents=ctx_latents, actions=actions,
               guidance=cfg.guidance, steps=cfg.steps, shift=cfg.shift, chunk=cfg.chunk, generator=gen,
               kv_cache=cfg.kv_cache)
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
            "rollout": rollout_line(pipe, out.kv_cache)}


def rollout_line(pipe: DiTPipeline, kv_cache: str) -> str:
    """How the transformer rolled out, for the user: its attention and the KV cache mode."""
    attention = pipe.transformer.config.attention
    how = "window recompute at every Euler step" if kv_cache == "off" else f"KV cache ({kv_cache})"
    return f"{attention} attention, {how}"
