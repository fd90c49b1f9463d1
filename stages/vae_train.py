"""`minisora vae train`: train a small AutoencoderKL from scratch, the offline default VAE.

Frames are drawn at random from a pool of whole training clips held in RAM; every
`refresh_every` steps one pooled clip is swapped for another, so the model sees the whole split
without one clip read per frame. Loss (the latent-diffusion VAE recipe without GAN/perceptual terms):

    loss = mean |x - decode(z)| + kl_weight * KL(q(z|x) || N(0, I)) / pixels_per_frame,   z ~ q(z|x)

i.e. L1 and KL both summed over a frame, as in LDM, divided by the same constant (Adam does not
care). Held-out PSNR is measured on uint8-rounded reconstructions of the posterior mean, over the
whole held-out set: PSNR = 10 log10(255^2 / MSE). Before saving, the config's `scaling_factor` is
set to 1 / std of the held-out latents (as for Stable Diffusion's 0.18215), so other diffusers
tools can use the model too; minisora stores raw latents and its own per-channel statistics.

After training, `copy_check` scores the VAE where `minisora eval` scores models (frames 4-15 of the
first 16 test clips, its defaults): its reconstruction, the ceiling of every model decoding through
it, against repeating the last context frame and decoding the last context latent repeated (PSNR of
the mean MSE). It goes into train_info.json, and a ceiling below copying is a warning.

Not resumable: a run is minutes on a CPU; run it again (same seed, same steps: the same model).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minisora.configs import EvalConfig, defaults
from minisora.configs import VAETrainConfig  # re-exported: the defaults live there, torch-free for the CLI
from minisora.data.clips import read_clip
from minisora.data.manifest import Manifest, ManifestClip
from minisora.dist import resolve_device
from minisora.errors import MinisoraWarning
from minisora.hardware import PrecisionChoice, autocast, resolve_precision
from minisora.vae import VideoVAE, frames_to_pixels, pixels_to_frames, tiny_vae_config


class VAETrainError(ValueError):
    """Input the trainer cannot use; the message names the file and the numbers."""


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays over all their pixels: 10 log10(255^2 / MSE)."""
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class FramePool:
    """Whole clips in RAM; `batch(n)` draws n random frames; `refresh()` swaps one clip for a new one."""

    def __init__(self, manifest: Manifest, clips: list[ManifestClip], size: int, rng: np.random.Generator):
        self.manifest, self.clips, self.rng = manifest, clips, rng
        self.pool = [self._read(i) for i in rng.choice(len(clips), size=min(size, len(clips)), replace=False)]

    def _read(self, i: int) -> np.ndarray:
        frames, _ = read_clip(self.manifest.abspath(self.clips[i]), self.manifest.kind)
        return frames  # uint8 (T, H, W, 3)

    def refresh(self) -> None:
        if len(self.pool) < len(self.clips):
            self.pool[self.rng.integers(len(self.pool))] = self._read(int(self.rng.integers(len(self.clips))))

    def batch(self, n: int) -> np.ndarray:
        which = self.rng.integers(len(self.pool), size=n)
        return np.stack([self.pool[c][self.rng.integers(len(self.pool[c]))] for c in which])  # (n, H, W, 3)


def held_out_frames(manifest: Manifest, n: int) -> tuple[np.ndarray, str]:
    """Up to n frames spread evenly over the test clips (the train clips if there is no test split)."""
    split = "test" if manifest.by_split("test") else "train"
    clips = manifest.by_split(split)[:n]
    per_clip = math.ceil(n / len(clips))
    out = []
    for clip in clips:
        frames, _ = read_clip(manifest.abspath(clip), manifest.kind)
        out.append(frames[np.unique(np.linspace(0, len(frames) - 1, min(per_clip, len(frames))).round().astype(int))])
    return np.concatenate(out)[:n], split


@torch.no_grad()
def reconstruct(vae: VideoVAE, frames: np.ndarray, batch: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 frames (N, H, W, 3) -> uint8 reconstructions of the posterior mean, and those means (N, C, h, w)."""
    recon, means = [], []
    for i in range(0, len(frames), batch):
        pixels = frames_to_pixels(frames[i:i + batch])[None]  # (1, n, 3, H, W)
        mean, _ = vae.encode(pixels)
        recon.append(pixels_to_frames(vae.decode(mean)[0]))
        means.append(mean[0])
    return np.concatenate(recon), torch.cat(means)


@torch.no_grad()
def decode_latents(vae: VideoVAE, latents: torch.Tensor) -> np.ndarray:
    """Raw latents (N, C, h, w) -> uint8 decoded frames (N, H, W, 3)."""
    return pixels_to_frames(vae.decode(latents[None])[0])


def copy_check(vae: VideoVAE, manifest: Manifest, context: int, frames: int, clips: int) -> dict:
    """How this VAE's ceiling compares with copying, on the frames `minisora eval` scores by default.

    On frames [context, frames) of the first `clips` test clips (train clips if there is no test
    split), the PSNR of the mean MSE of: the VAE's reconstruction (the ceiling of every model that
    decodes through it), repeating the last context frame, and decoding the last context latent
    repeated. A ceiling below a copy means no model decoding through this VAE can beat copying there.
    """
    split = "test" if manifest.by_split("test") else "train"
    chosen = [c for c in manifest.by_split(split) if c.frames >= frames][:clips]
    if not chosen:
        return {"skipped": f"no {split} clip has {frames} frames"}
    truth = np.stack([read_clip(manifest.abspath(c), manifest.kind, 0, frames)[0] for c in chosen])  # (M, N, H, W, 3)
    recon, means = reconstruct(vae, truth.reshape(-1, *truth.shape[2:]))
    recon = recon.reshape(truth.shape)
    copied = means.reshape(len(chosen), frames, *means.shape[1:])[:, context - 1]  # (M, C, h, w)
    copy = decode_latents(vae, copied)
    target = truth[:, context:]
    return {"split": split, "clips": len(chosen), "context_frames": context, "frames": frames,
            "vae_reconstruction": psnr(target, recon[:, context:]),
            "repeat_last_context_frame": psnr(target, np.broadcast_to(truth[:, context - 1: context], target.shape)),
            "latent_copy": psnr(target, np.broadcast_to(copy[:, None], target.shape))}


def _check_data(cfg: VAETrainConfig, manifest: Manifest) -> list[ManifestClip]:
    train = manifest.by_split("train")
    if not train:
        raise VAETrainError(f"{cfg.manifest}: no train clips (splits: {manifest.split_counts()})")
    sizes = sorted({(c.height, c.width) for c in manifest.clips})
    if len(sizes) > 1:
        raise VAETrainError(f"{cfg.manifest}: clips have several frame sizes {sizes}; the VAE trains on one")
    h, w = sizes[0]
    if h % cfg.downsample or w % cfg.downsample:
        raise VAETrainError(f"{cfg.manifest}: frame size {h}x{w} is not divisible by --downsample {cfg.downsample}")
    return train


def _step(model, pixels: torch.Tensor, cfg: VAETrainConfig, gen: torch.Generator,
          precision: PrecisionChoice) -> tuple[torch.Tensor, float]:
    """One loss evaluation on pixels (B, 3, H, W); returns the loss and the batch's PSNR in dB.

    The encoder and decoder run under the precision's autocast; the loss is computed in fp32."""
    with autocast(pixels.device, precision):
        posterior = model.encode(pixels).latent_dist
        recon = model.decode(posterior.sample(generator=gen)).sample  # (B, 3, H, W)
    err = recon.float() - pixels
    rec = err.abs().mean() if cfg.loss == "l1" else err.pow(2).mean()
    kl = posterior.kl().mean() / pixels[0].numel()  # kl() sums over (C, h, w)
    mse = err.detach().clamp(-2, 2).pow(2).mean().item()  # pixels span 2: PSNR = 10 log10(2^2 / mse)
    return rec + cfg.kl_weight * kl, 10 * math.log10(4 / max(mse, 1e-12))


def _train(cfg: VAETrainConfig, model, vae: VideoVAE, opt, pool: FramePool, eval_frames: np.ndarray, fmt,
           gen: torch.Generator, choice, device):
    """The training loop, bounded by cfg.steps (and by cfg.max_minutes when given, which makes the result
    machine-dependent); returns (history, last held-out PSNR, steps done, last eval's latent means, seconds)."""
    history, test_psnr, step, t0 = [], float("nan"), 0, time.perf_counter()
    model.train().requires_grad_(True)  # from_model froze it for inference
    bar = tqdm(total=cfg.steps, desc="vae train", dynamic_ncols=True)
    while step < cfg.steps:
        if step and step % cfg.refresh_every == 0:
            pool.refresh()
        pixels = frames_to_pixels(pool.batch(cfg.batch_size)).to(device, memory_format=fmt)  # (B, 3, H, W)
        loss, batch_psnr = _step(model, pixels, cfg, gen, choice)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            model.eval()
            recon, means = reconstruct(vae, eval_frames)
            test_psnr = psnr(eval_frames, recon)
            history.append({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                            "test_psnr": round(test_psnr, 3)})
            model.train()
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{batch_psnr:.1f}", test=f"{test_psnr:.1f}")
        bar.update(1)
        if out_of_time:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    return history, test_psnr, step, means, seconds


def _save(cfg: VAETrainConfig, model, out: Path, eval_frames: np.ndarray, eval_split: str, means: torch.Tensor,
          facts: dict) -> dict:
    """Save the model (scaling factor from the last eval's latent means) and OUT/train_info.json; return the info."""
    model.eval().requires_grad_(False).to(memory_format=torch.contiguous_format)  # safetensors wants contiguous
    model.register_to_config(scaling_factor=float(1 / means.std().clamp_min(1e-6)))  # means of the last eval
    baseline = psnr(eval_frames, np.broadcast_to(eval_frames.mean(0), eval_frames.shape))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    info = {
        "test_psnr": facts["test_psnr"],
        "eval_split": eval_split,
        "eval_frames": len(eval_frames),
        "mean_frame_baseline_psnr": baseline,  # PSNR of the held-out frames' own mean frame
        "parameters": facts["parameters"],
        "steps": facts["steps"],
        "seconds": facts["seconds"],
        "scaling_factor": model.config.scaling_factor,
        "frame_size": list(eval_frames.shape[1:3]),
        "train_clips": facts["train_clips"],
        "device": facts["device"],
        "precision": facts["precision"],
        "history": facts["history"],
        "config": asdict(cfg),
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(cfg: VAETrainConfig) -> dict:
    from diffusers import AutoencoderKL

    if cfg.loss not in ("l1", "mse"):
        raise VAETrainError(f"loss must be l1 or mse, got {cfg.loss!r}")
    out = Path(cfg.out)
    if (out / "config.json").exists() and not cfg.overwrite:
        raise VAETrainError(f"{out}: already holds a model (config.json); pass --overwrite to replace it")
    manifest = Manifest.load(cfg.manifest)
    train_clips = _check_data(cfg, manifest)
    device = resolve_device(cfg.device)
    choice = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)

    model = AutoencoderKL(**tiny_vae_config("kl", cfg.latent_channels, cfg.downsample, cfg.width)).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    vae = VideoVAE.from_model(model, source=str(out))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pool = FramePool(manifest, train_clips, cfg.pool_clips, rng)
    eval_frames, eval_split = held_out_frames(manifest, cfg.eval_frames)
    print(f"AutoencoderKL: {n_params / 1e6:.2f}M parameters, {cfg.downsample}x down, {cfg.latent_channels} latent "
          f"channels; {len(train_clips)} train clips ({len(pool.pool)} in RAM), {len(eval_frames)} {eval_split} frames "
          f"held out; device {device}, {choice.line()}")

    history, test_psnr, step, means, seconds = _train(cfg, model, vae, opt, pool, eval_frames, fmt, gen, choice,
                                                      device)

    info = _save(cfg, model, out, eval_frames, eval_split, means, dict(
        test_psnr=test_psnr, parameters=n_params, steps=step, seconds=round(seconds, 1),
        train_clips=len(train_clips), device=str(device), precision=choice.precision, history=history))
    baseline = info["mean_frame_baseline_psnr"]
    print(f"saved {out}: {eval_split} PSNR {test_psnr:.2f} dB (mean-frame baseline {baseline:.2f} dB) "
          f"after {step} steps in {seconds:.0f}s")
    _report_copy_check(vae, manifest, out, info)
    return info


def _report_copy_check(vae: VideoVAE, manifest: Manifest, out: Path, info: dict) -> None:
    """copy_check on eval's default frames, added to train_info.json, printed, and a warning when copying wins."""
    ev = defaults(EvalConfig)
    check = copy_check(vae, manifest, ev.context_frames, ev.frames, ev.num_clips)
    info["copy_check"] = check
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if "skipped" in check:
        return
    ceiling, copy = check["vae_reconstruction"], max(check["repeat_last_context_frame"], check["latent_copy"])
    print(f"frames {check['context_frames']}-{check['frames'] - 1} of {check['clips']} {check['split']} clips (what "
          f"eval scores): reconstruction {ceiling:.2f} dB, repeat-last-frame {check['repeat_last_context_frame']:.2f}, "
          f"latent copy {check['latent_copy']:.2f} (PSNR of the mean MSE)")
    if ceiling <= copy:
        warnings.warn(f"{out}: the VAE's reconstruction ({ceiling:.2f} dB) is not above copying ({copy:.2f} dB) on "
                      "the frames eval scores: no model decoding through it can beat copying there; train it longer "
                      "or wider (minisora vae train --help)", MinisoraWarning, stacklevel=2)
