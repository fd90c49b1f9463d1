"""What training reports while it trains: metrics (metrics.jsonl, TensorBoard, wandb) and validation samples.

The checkpoint's `pipeline/` directory is written by minisora.run_dir (save_run); the validator builds its
pipeline from the same description (pipeline_meta), so what it samples is what `minisora sample` would load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minisora.context import load_context, side_by_side
from minisora.dist import print0
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.run_dir import build_pipeline, pipeline_meta
from minisora.store import LatentStore


class Validator:
    """Rank 0, every --sample-every steps: continue a few held-out clips with the EMA weights, decode
    them with the store's VAE, save ground truth | generation gifs and report PSNR of the generated
    frames (and of repeating the last context frame). Decoding here is validation, not training."""

    def __init__(self, cfg, store: LatentStore, model: VideoDiT, device: torch.device, clips: int = 2):
        meta = pipeline_meta(store, cfg, model.config.num_actions)
        self.pipe = build_pipeline(DiTPipeline, VideoDiT.from_config(model.config), meta, device, store.url)
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

        self.pipe.transformer.load_state_dict(ema)
        k_pix = self.pipe.video_vae.pixel_frames(self.context)
        psnr, psnr_repeat = [], []
        for i in self.clips:
            ctx = load_context(self.pipe, f"{self.store.url}:{self.split}:{i}", self.context)
            acts = None
            if self.cfg.use_actions and ctx.actions is not None:
                acts = torch.from_numpy(ctx.actions[: self.total])[None]
            out = self.pipe(num_inference_steps=10, num_frames=self.total, context_latents=ctx.latents, actions=acts,
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
