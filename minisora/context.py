"""What a continuation starts from, and how it is shown: context latents, ground truth and actions.

A context source is a TECO clip file (`.npz` DMLab, `.mp4` Minecraft), encoded by the pipeline's VAE,
or a store reference `STORE:SPLIT:INDEX` (latents straight from the store, ground truth from the
store's source clip). Frames are taken at the pipeline's frame stride and resolution, so the truth
lines up with what the model generates. Used by `minisora sample`, `minisora eval` and the validator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from minisora.data.clips import read_clip
from minisora.errors import MinisoraError
from minisora.store import LatentStore
from minisora.store_guard import check_vae

if TYPE_CHECKING:
    from minisora.pipeline import DiTPipeline


class ContextError(MinisoraError, RuntimeError):
    """A context clip, store reference or actions file that cannot be used; the message names it."""


@dataclass
class Context:
    latents: torch.Tensor  # (1, K, C, h, w) normalised
    truth: np.ndarray | None  # uint8 (T, H, W, 3) ground-truth frames at the pipeline's stride and size
    actions: np.ndarray | None  # (T',) per latent frame
    name: str


def _kind_of(path: Path) -> str:
    kind = {".npz": "dmlab", ".mp4": "minecraft"}.get(path.suffix.lower())
    if kind is None:
        raise ContextError(f"{path}: context clips must be .npz (DMLab) or .mp4 (Minecraft)")
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
        return _store_context(pipe, source, parts[0], parts[1], int(parts[2]), k)
    path = Path(source)
    if not path.exists():
        raise ContextError(f"context {source}: no such file, and not a STORE:SPLIT:INDEX reference")
    frames, actions = clip_frames(pipe, path, _kind_of(path))
    pix = pipe.video_vae.pixel_frames(k)
    if len(frames) < pix:
        raise ContextError(f"{path}: {len(frames)} frames < {pix} needed for {k} context latent frames")
    latents = pipe.encode_frames(frames[None, :pix])
    lat_actions = None
    if actions is not None:  # one per latent frame, as the encode stage stores them
        lat_actions = pipe.video_vae.latent_actions(actions, pipe.video_vae.latent_frames(len(frames)))
    return Context(latents, frames, lat_actions, path.stem)


def _store_context(pipe: DiTPipeline, source: str, url: str, split: str, idx: int, k: int) -> Context:
    """load_context for `source` = URL:SPLIT:IDX: the store's latents, its source clip as the truth (if still there)."""
    store = LatentStore(url)
    store.require_complete()  # latent statistics exist only once every shard is in
    check_vae(store.attrs.get("vae"), pipe.video_vae.identity(), source,
              f"the pipeline's VAE ({pipe.video_vae.info.source})")
    lay = store.layout(split)
    if not 0 <= idx < lay.clips:
        raise ContextError(f"{source}: index {idx} out of range, {split} has {lay.clips} clips")
    n = int(store.read(split, "length", idx))
    if n < k:
        raise ContextError(f"{source}: clip has {n} latent frames < {k} context frames")
    channels = pipe.transformer.config.in_channels
    if lay.channels != channels:
        raise ContextError(f"{source}: the store has {lay.channels} latent channels, the model {channels}")
    mean = torch.from_numpy(store.read(split, "mean", (idx, slice(0, k))).astype(np.float32))[None]
    actions = store.read(split, "actions", (idx, slice(0, n))).astype(np.int64)
    manifest = store.manifest_json()
    clip = [c for c in manifest["clips"] if c["split"] == split][idx]
    path = Path(manifest["root"]) / clip["path"]
    truth = clip_frames(pipe, path, manifest["kind"])[0] if path.exists() else None
    return Context(pipe.normalize_latents(mean), truth, actions if (actions >= 0).all() else None, f"{split}-{idx}")


def load_actions(spec: str | None, ctx: Context | None, total: int, videos: int) -> torch.Tensor | None:
    """(videos, total) actions, one per latent frame: the context clip's ("context"), a file's, or None.

    A file is a .npy array or a .npz with an `actions` array, (T,) ints read as per latent frame.
    """
    if spec is None or spec == "none":
        return None
    if spec == "context":
        if ctx is None or ctx.actions is None:
            raise ContextError("--actions context needs a --context clip that has recorded actions")
        acts = ctx.actions
    else:
        acts = _read_actions_file(Path(spec))
    acts = np.asarray(acts, dtype=np.int64)
    if len(acts) < total:
        raise ContextError(f"{spec}: {len(acts)} actions < {total} latent frames to generate")
    return torch.from_numpy(acts[:total])[None].repeat(videos, 1)


def _read_actions_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ContextError(f"--actions {path}: no such file (use 'context', a .npy file or a .npz with `actions`)")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "actions" not in loaded.files:
                raise ContextError(f"{path}: no `actions` array (has: {', '.join(loaded.files) or 'nothing'})")
            acts = loaded["actions"]
    else:
        acts = loaded
    if acts.ndim != 1 or not np.issubdtype(acts.dtype, np.integer):
        raise ContextError(f"{path}: actions must be a 1-D integer array, got {acts.dtype} {acts.shape}")
    return acts


# ------------------------------------------------------------------------------ showing it
def mark_context(frames: np.ndarray, n: int, color=(255, 0, 0), width: int = 2) -> np.ndarray:
    """Draw a coloured border on the first n frames (the given context)."""
    out = frames.copy()
    out[:n, :width], out[:n, -width:], out[:n, :, :width], out[:n, :, -width:] = color, color, color, color
    return out


def side_by_side(truth: np.ndarray, generated: np.ndarray, context_pixels: int) -> np.ndarray:
    """Ground truth | generation, frame by frame (uint8 (T, H, 2W + 4, 3)), context frames framed."""
    t = min(len(truth), len(generated))
    gap = np.full((t, generated.shape[1], 4, 3), 255, np.uint8)
    return np.concatenate([mark_context(truth[:t], context_pixels), gap, mark_context(generated[:t], context_pixels)],
                          axis=2)
