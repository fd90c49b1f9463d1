"""`minisora eval`: continuation quality on held-out clips, following TECO's protocol.

For M clips of a split: the first K latent frames (from the store) are context, the model generates
up to N latent frames, the VAE decodes them. Metrics are computed on generated frames only, against
the ground-truth pixels of the source clips: PSNR and SSIM per frame, averaged over time, then over
clips; mean and std over seeds. Two baselines on the same clips and frames: repeating the last
context frame, and the VAE reconstruction of the ground truth (the ceiling the VAE sets). FVD
(StyleGAN-V's I3D TorchScript, if given) on full videos with the context copied in, as TECO does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from minisora.metrics import I3DFeatures, frames_to_unit, fvd, lpips_available, summarize_seeds, video_metrics
from minisora.store import LatentStore
from minisora.dist import resolve_device
from stages.sample import clip_frames, load_pipeline, precision_dtype


@dataclass
class EvalConfig:
    checkpoint: str
    store: str
    out: str = "report.json"
    split: str = "test"
    context_frames: int = 4  # K latent frames of context
    frames: int = 16  # N latent frames in all (context included)
    num_clips: int = 16
    seeds: int = 3
    steps: int = 20
    shift: float | None = None
    chunk: int = 1  # new latent frames per rollout window
    guidance: float = 1.0  # classifier-free guidance scale on actions (models trained with actions)
    batch_size: int = 8  # clips per pipeline call
    i3d: str | None = None
    device: str = "auto"
    precision: str = "auto"  # the transformer's dtype: minisora.hardware.resolve_precision


def _clip_mean(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in metrics.items()}


def main(cfg: EvalConfig) -> dict:
    torch.set_flush_denormal(True)  # denormal floats make CPU convs/matmuls ~30x slower (seen in vae train)
    if not 1 <= cfg.context_frames < cfg.frames:
        raise ValueError(f"--frames {cfg.frames} must exceed --context-frames {cfg.context_frames} (>= 1)")
    device = resolve_device(cfg.device)
    pipe = load_pipeline(cfg.checkpoint, device, precision_dtype(cfg.precision, device))
    pipe.set_progress_bar_config(disable=True)
    store = LatentStore(cfg.store)
    store.require_complete()
    store.layout(cfg.split)  # a missing split is a StoreError naming the ones there are
    k_pix, n_pix = pipe.video_vae.pixel_frames(cfg.context_frames), pipe.video_vae.pixel_frames(cfg.frames)

    # 1. clips: the first M of the split long enough for N latent frames, ground truth from the source clips
    lengths = store.array(cfg.split, "length")[:]
    chosen = [int(i) for i in np.flatnonzero(lengths >= cfg.frames)[: cfg.num_clips]]
    if not chosen:
        raise ValueError(f"no clip in {cfg.split} has {cfg.frames} latent frames (longest: {int(lengths.max())})")
    manifest = store.manifest_json()
    split_clips = [c for c in manifest["clips"] if c["split"] == cfg.split]
    truth = np.stack([clip_frames(pipe, Path(manifest["root"]) / split_clips[i]["path"], manifest["kind"])[0][:n_pix]
                      for i in chosen])  # (M, N_pix, H, W, 3) uint8
    st = store.attrs["latent_stats"]
    mu, sd = (torch.tensor(st[x]).view(1, 1, -1, 1, 1) for x in ("mean", "std"))
    means = torch.from_numpy(store.array(cfg.split, "mean").get_orthogonal_selection((chosen, slice(0, cfg.frames))).astype(np.float32))
    latents_gt = (means - mu) / sd  # (M, N, C, h, w) normalised posterior means
    acts = store.array(cfg.split, "actions").get_orthogonal_selection((chosen, slice(0, cfg.frames))).astype(np.int64)
    use_actions = pipe.transformer.config.num_actions > 0 and (acts >= 0).all()

    gt_unit = frames_to_unit(truth)
    gen_slice = slice(k_pix, n_pix)  # metrics on generated frames only

    # 2. baselines (deterministic, computed once)
    repeat = np.repeat(truth[:, k_pix - 1: k_pix], n_pix - k_pix, axis=1)
    recon = np.concatenate([_decode(pipe, latents_gt[i:i + cfg.batch_size]) for i in range(0, len(chosen), cfg.batch_size)])
    baselines = {"repeat_last_context_frame": _clip_mean(video_metrics(frames_to_unit(repeat), gt_unit[:, gen_slice])),
                 "vae_reconstruction": _clip_mean(video_metrics(frames_to_unit(recon[:, gen_slice]), gt_unit[:, gen_slice]))}

    # 3. the model, once per seed
    per_seed, videos_by_seed = [], []
    for seed in range(cfg.seeds):
        gen = torch.Generator().manual_seed(seed)
        frames = []
        for i in range(0, len(chosen), cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            out = pipe(context_latents=latents_gt[sl, : cfg.context_frames], num_frames=cfg.frames,
                       actions=torch.from_numpy(acts[sl]) if use_actions else None, steps=cfg.steps, shift=cfg.shift, chunk=cfg.chunk,
                       guidance=cfg.guidance,
                       generator=gen, progress=False)
            frames.append(out.frames)
        frames = np.concatenate(frames)[:, :n_pix]
        per_seed.append(_clip_mean(video_metrics(frames_to_unit(frames[:, gen_slice]), gt_unit[:, gen_slice])))
        videos_by_seed.append(frames)
        print(f"    seed {seed}: PSNR {per_seed[-1]['psnr']:.2f} dB, SSIM {per_seed[-1]['ssim']:.4f}", flush=True)

    model = {m: summarize_seeds([s[m] for s in per_seed]) for m in ("psnr", "ssim")}
    report = {"config": asdict(cfg), "clips": [split_clips[i]["path"] for i in chosen],
              "generated_frames_per_clip": n_pix - k_pix, "context_frames_pixels": k_pix,
              "model": model, "per_seed": per_seed, "baselines": baselines,
              "psnr_gain_over_repeat_db": model["psnr"]["mean"] - baselines["repeat_last_context_frame"]["psnr"],
              "ssim_gain_over_repeat": model["ssim"]["mean"] - baselines["repeat_last_context_frame"]["ssim"],
              "use_actions": bool(use_actions),
              "rollout": {"window": pipe.config.window_frames, "chunk": cfg.chunk}}

    # 4. FVD on full videos with the ground-truth context copied in (TECO)
    if cfg.i3d:
        i3d = I3DFeatures(cfg.i3d, device=device)
        real = i3d(truth)
        scores = []
        for videos in videos_by_seed:
            full = videos.copy()
            full[:, :k_pix] = truth[:, :k_pix]
            scores.append(fvd(real, i3d(full)))
        report["fvd"] = summarize_seeds(scores)
    else:
        report["fvd"] = "skipped: pass --i3d PATH (StyleGAN-V's i3d_torchscript.pt) to compute FVD"
    report["lpips"] = "skipped: no local LPIPS weights" if not lpips_available() else "available but not computed"

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    from minisora.vae import pixels_to_frames

    return pixels_to_frames(pipe.decode_latents(latents.to(pipe.device)))


def format_table(report: dict) -> str:
    """The report as a small text table (mean ± std over seeds for the model)."""
    m, b = report["model"], report["baselines"]
    rows = [("model (continuation)", f"{m['psnr']['mean']:.2f} ± {m['psnr']['std']:.2f}", f"{m['ssim']['mean']:.4f} ± {m['ssim']['std']:.4f}"),
            ("repeat last context frame", f"{b['repeat_last_context_frame']['psnr']:.2f}", f"{b['repeat_last_context_frame']['ssim']:.4f}"),
            ("VAE reconstruction (ceiling)", f"{b['vae_reconstruction']['psnr']:.2f}", f"{b['vae_reconstruction']['ssim']:.4f}")]
    lines = [f"{'':<30}{'PSNR (dB)':>16}{'SSIM':>20}"] + [f"{a:<30}{p:>16}{s:>20}" for a, p, s in rows]
    lines.append(f"model vs repeat-last-frame: {report['psnr_gain_over_repeat_db']:+.2f} dB PSNR, "
                 f"{report['ssim_gain_over_repeat']:+.4f} SSIM over {len(report['clips'])} clips x "
                 f"{report['generated_frames_per_clip']} generated frames, {report['config']['seeds']} seeds")
    fv = report["fvd"]
    lines.append(f"FVD: {fv['mean']:.1f} ± {fv['std']:.1f}" if isinstance(fv, dict) else f"FVD: {fv}")
    return "\n".join(lines)
