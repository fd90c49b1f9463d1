"""The run directory's format: training writes it, sampling, eval and the validator read it, all through here.

A training run `RUN/` holds `checkpoints/step-N/`, and each checkpoint a `pipeline/` directory:

    pipeline/transformer/            the EMA transformer (VideoDiT.save_pretrained, safetensors)
    pipeline/minisora_pipeline.json  what sampling needs besides the weights (pipeline_meta): the VAE to
                                     decode with (source, revision, weights_sha256), the store's latent
                                     statistics and source (fps, frame stride, resolution), the window,
                                     the latent size, actions, the scheduler's time shift, and the
                                     flow the transformer was trained with ("flow": path and prediction,
                                     minisora.interpolants; a run written before it loads as linear, velocity)

The VAE is named, not copied (docs/design-notes.md). A full `DiTPipeline.save_pretrained` directory
(model_index.json) is self-contained and loads too. `DiTPipeline.save_run` / `DiTPipeline.from_run`
are the front door (as diffusers' save_pretrained / from_pretrained); this module is what they call.
The pipeline class is passed in (`cls`), so this module does not import minisora.pipeline.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minisora.checkpoint import DIGESTS, list_checkpoints, verify_digests
from minisora.errors import MinisoraError
from minisora.interpolants import check_path
from minisora.model import VideoDiT

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline  # the class passed in is minisora.pipeline.DiTPipeline

    from minisora.store import LatentStore

PIPELINE_JSON = "minisora_pipeline.json"


class RunDirError(MinisoraError, RuntimeError):
    """A run, checkpoint or pipeline directory that cannot be loaded; the message names the path."""


# ------------------------------------------------------------------------------ writing
def pipeline_meta(store: LatentStore, cfg, num_actions: int) -> dict:
    """What sampling needs besides the weights: the VAE to decode with, latent statistics, geometry.
    `cfg` is the training config (its split, frames and use_actions)."""
    lay = store.layout(cfg.split)
    return {"vae": store.attrs["vae"], "latent_stats": store.attrs["latent_stats"], "source": store.attrs["source"],
            "store": store.url, "frames": cfg.frames, "latent_size": [lay.height, lay.width],
            "use_actions": cfg.use_actions, "num_actions": num_actions,
            "scheduler": {"type": "flow_euler", "shift": 1.0},
            "flow": {"path": cfg.flow.path, "prediction": cfg.flow.prediction},
            "retrieve_frames": getattr(cfg, "retrieve_frames", 0),
            "retrieve_motion": getattr(cfg, "retrieve_motion", ""),
            "retrieve_radius": getattr(cfg, "retrieve_radius", 0.0)}


def save_run(path: Path, model: VideoDiT, weights: dict[str, torch.Tensor], store: LatentStore, cfg) -> None:
    """Write the `pipeline/` directory load_run reads: the transformer with `weights` (the EMA) + PIPELINE_JSON."""
    path = Path(path)
    ema_model = VideoDiT.from_config(model.config)
    ema_model.load_state_dict({k: v.to("cpu", torch.float32) for k, v in weights.items()})
    ema_model.save_pretrained(path / "transformer", safe_serialization=True)
    meta = pipeline_meta(store, cfg, model.config.num_actions)
    (path / PIPELINE_JSON).write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------ reading
def resolve_pipeline_dir(path: str | Path) -> Path:
    """The pipeline directory of a run (its newest complete checkpoint), a checkpoint, or a pipeline directory."""
    path = Path(path)
    if (path / "model_index.json").exists() or (path / PIPELINE_JSON).exists():
        return path
    if (path / "pipeline").is_dir():
        return path / "pipeline"
    ckpts = list_checkpoints(path)  # complete step-* only: never a .tmp or an abandoned branch
    if ckpts:
        return ckpts[-1] / "pipeline"
    raise RunDirError(f"{path}: not a run, checkpoint or pipeline directory (no checkpoints/, pipeline/, "
                      f"model_index.json or {PIPELINE_JSON})")


def read_description(path: str | Path) -> dict:
    """The training pipeline description (pipeline_meta) of a run, checkpoint or pipeline directory: its store, source
    dataset, actions; {} for a `save_pretrained` directory, which records none."""
    pdir = resolve_pipeline_dir(path)
    meta = pdir / PIPELINE_JSON
    return json.loads(meta.read_text()) if meta.is_file() else {}


def pipeline_kwargs(meta: dict) -> dict:
    """DiTPipeline's config values from a training pipeline description."""
    src, flow = meta.get("source", {}), meta.get("flow", {})  # no "flow": a run from before SiT's choices
    return {"path": flow.get("path", "linear"), "prediction": flow.get("prediction", "velocity"),
            "latents_mean": meta["latent_stats"]["mean"], "latents_std": meta["latent_stats"]["std"],
            "window_frames": meta["frames"], "latent_size": meta["latent_size"], "fps": src.get("fps"),
            "frame_stride": src.get("frame_stride", 1), "resolution": src.get("resolution"),
            "retrieve_frames": meta.get("retrieve_frames", 0),  # absent in older runs: none
            "retrieve_motion": meta.get("retrieve_motion", ""), "retrieve_radius": meta.get("retrieve_radius", 0.0)}


def build_pipeline(cls: type[DiffusionPipeline], transformer: VideoDiT, meta: dict, device: torch.device | str,
                   where: str) -> DiffusionPipeline:
    """A `cls` pipeline around `transformer` with the VAE, scheduler and statistics `meta` names, on `device`.
    The VAE must still hold the weights the latents were encoded with (`where` names the run in the error)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from minisora.vae import VideoVAE

    try:
        check_path(meta.get("flow", {}).get("path", "linear"), meta.get("flow", {}).get("prediction", "velocity"))
    except ValueError as e:
        raise RunDirError(f"{where}: {PIPELINE_JSON}'s flow: {e}") from None
    v = meta["vae"]
    vae = VideoVAE.load(v["source"], subfolder=v.get("subfolder"), revision=v.get("revision"), device=device)
    if v.get("weights_sha256") not in (None, vae.info.weights_sha256):
        raise RunDirError(f"{where}: the model was trained on latents of VAE weights {v['weights_sha256'][:16]}, "
                          f"but {v['source']} now holds weights {vae.info.weights_sha256[:16]}; "
                          "restore that VAE there")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=meta.get("scheduler", {}).get("shift", 1.0))
    pipe = cls(transformer, vae.model, scheduler, **pipeline_kwargs(meta)).to(device)
    return pipe


def load_run(cls: type[DiffusionPipeline], path: str | Path, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """A `cls` pipeline from any of the directory kinds resolve_pipeline_dir takes, on `device`.

    The transformer is loaded in `dtype` (default: sampling_dtype(device), bf16 on CUDA), with
    `torch_dtype` at load time rather than a cast afterwards; the VAE and the Euler integration stay float32.
    """
    pdir = resolve_pipeline_dir(path)
    check_pipeline_files(pdir)
    dtype = dtype or sampling_dtype(torch.device(device))
    if (pdir / "model_index.json").exists():
        with warnings.catch_warnings():  # diffusers 0.42 prefers dtype; torch_dtype works with older ones too
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pretrained(str(pdir), torch_dtype={"transformer": dtype, "default": torch.float32})
        return pipe.to(device)
    meta = json.loads((pdir / PIPELINE_JSON).read_text())
    transformer = VideoDiT.from_pretrained(str(pdir / "transformer"), torch_dtype=dtype)
    return build_pipeline(cls, transformer, meta, device, str(pdir))


def check_pipeline_files(pdir: Path) -> None:
    """A checkpoint's pipeline/ checked against the checkpoint's digests.json (a damaged file: RunDirError naming
    it; a checkpoint without digests: one warning). A pipeline directory outside a checkpoint is not checked."""
    ckpt = pdir.parent
    if pdir.name != "pipeline" or not ((ckpt / DIGESTS).is_file() or (ckpt / "state.json").is_file()):
        return
    try:
        verify_digests(ckpt, under="pipeline/")
    except MinisoraError as e:
        raise RunDirError(str(e)) from None


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The transformer's dtype when sampling: bf16 on CUDA GPUs that support it, float32 otherwise."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The transformer's dtype for `--precision` on `device` (the hardware rule); prints the choice once."""
    from minisora.hardware import resolve_precision

    choice = resolve_precision(precision, device)
    print(f"sampling {choice.line()}", flush=True)
    return choice.autocast_dtype or torch.float32
