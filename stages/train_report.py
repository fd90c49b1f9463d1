"""What stage two reports while it trains: metrics (metrics.jsonl, TensorBoard, wandb) and validation samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minisora.dist import print0
from minisora.model import VideoDiT
from minisora.store import LatentStore


def pipeline_meta(store: LatentStore, cfg, num_actions: int) -> dict:
    """What sampling needs besides the weights: the VAE to decode with, latent statistics, geometry."""
    lay = store.layout(cfg.split)
    return {"vae": store.attrs["vae"], "latent_stats": store.attrs["latent_stats"], "source": store.attrs["source"],
            "store": store.url, "frames": cfg.frames, "latent_size": [lay.height, lay.width],
            "use_actions": cfg.use_actions, "num_actions": num_actions,
            "scheduler": {"type": "flow_euler", "shift": 1.0}}


def save_pipeline(path: Path, model: VideoDiT, weights: dict[str, torch.Tensor], store: LatentStore, cfg) -> None:
    """A directory `minisora sample` loads: the transformer with `weights` (the EMA) + minisora_pipeline.json."""
    ema_model = VideoDiT.from_config(model.config)
    ema_model.load_state_dict({k: v.to("cpu", torch.float32) for k, v in weights.items()})
    ema_model.save_pretrained(path / "transformer", safe_serialization=True)
    meta = pipeline_meta(store, cfg, model.config.num_actions)
    (path / "minisora_pipeline.json").write_text(json.dumps(meta, indent=2))


class Validator:
    """Rank 0, every --sample-every steps: continue a few held-out clips with the EMA weights, decode
    them with the store's VAE, save ground truth | generation gifs and report PSNR of the generated
    frames (and of repeating the last context frame). Decoding here is validation, not training."""

    def __init__(self, cfg, store: LatentStore, model: VideoDiT, device: torch.device, clips: int = 2):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from minisora.pipeline import DiTPipeline
        from minisora.vae import VideoVAE
        from stages.sample import pipeline_kwargs

        v = store.attrs["vae"]
        vae = VideoVAE.load(v["source"], subfolder=v.get("subfolder"), revision=v.get("revision"), device=device)
        meta = pipeline_meta(store, cfg, model.config.num_actions)
        self.pipe = DiTPipeline(VideoDiT.from_config(model.config), vae.model,
                                FlowMatchEulerDiscreteScheduler(shift=1.0),
                                **pipeline_kwargs(meta)).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.store, self.cfg = store, cfg
        self.split = "test" if "test" in store.splits else cfg.split
        self.context = max(1, cfg.frames // 2)
        self.total = 2 * cfg.frames
        lengths = store.array(self.split, "length")[:]
        self.clips = [int(i) for i in np.flatnonzero(lengths >= self.total)[:clips]]

    @torch.no_grad()
    def __call__(self, step: int, ema: dict[str, torch.Tensor]) -> dict:
        from minisora.metrics import frames_to_unit, psnr_per_frame
        from minisora.video import write_gif
        from stages.sample import load_context, side_by_side

        self.pipe.transformer.load_state_dict(ema)
        k_pix = self.pipe.video_vae.pixel_frames(self.context)
        psnr, psnr_repeat = [], []
        for i in self.clips:
            ctx = load_context(self.pipe, f"{self.store.url}:{self.split}:{i}", self.context)
            acts = None
            if self.cfg.use_actions and ctx.actions is not None:
                acts = torch.from_numpy(ctx.actions[: self.total])[None]
            out = self.pipe(context_latents=ctx.latents, num_frames=self.total, actions=acts, steps=10,
                            generator=torch.Generator().manual_seed(i), progress=False)
            frames = out.frames[0]
            if ctx.truth is None:
                continue
            n = min(len(frames), len(ctx.truth))
            truth = frames_to_unit(ctx.truth[None, k_pix:n])  # (1, T, 3, H, W)
            psnr.append(float(psnr_per_frame(frames_to_unit(frames[None, k_pix:n]), truth).mean()))
            repeat = np.repeat(ctx.truth[k_pix - 1:k_pix], n - k_pix, axis=0)
            psnr_repeat.append(float(psnr_per_frame(frames_to_unit(repeat[None]), truth).mean()))
            write_gif(Path(self.cfg.out) / "samples" / f"step-{step:08d}-{self.split}-{i}.gif",
                      side_by_side(ctx.truth, frames, k_pix), fps=8)
        if not psnr:
            return {}
        return {"val_psnr": sum(psnr) / len(psnr), "val_psnr_repeat_last": sum(psnr_repeat) / len(psnr_repeat)}


class Logger:
    """metrics.jsonl + TensorBoard (+ wandb when asked and installed), rank 0 only."""

    def __init__(self, cfg, enabled: bool):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(cfg.out) / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.out) / "tensorboard"))
        except ImportError:
            print0("tensorboard not installed: logging to metrics.jsonl only")
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="minisora", config=config_json(cfg), dir=cfg.out)
            except ImportError:
                print0("--wandb asked for but wandb is not installed (pip install wandb): skipped")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


    def event(self, **fields) -> None:
        """A line that is not a step's metrics (a resume, a branch): it carries `at_step`, not `step`."""
        if self.enabled:
            self.jsonl.write(json.dumps(fields) + "\n")
            self.jsonl.flush()


def config_json(cfg) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg)))
