"""`minisora eval`: continuation quality on held-out clips, following TECO's protocol.

For M clips of a split: the first K latent frames (from the store) are context, the model generates
up to N latent frames, the VAE decodes them. Metrics are computed on generated frames only, against
the ground-truth pixels of the source clips: PSNR and SSIM per frame, averaged over time, then over
clips; mean and std over seeds. Three baselines on the same clips and frames: repeating the last
context frame (pixels), decoding the last context latent repeated (`latent_copy`: what the model
must beat to have learnt any dynamics through this VAE), and the VAE reconstruction of the ground
truth (the ceiling the VAE sets). FVD (StyleGAN-V's I3D TorchScript, if given) on full videos with
the context copied in, as TECO does.

Beside TECO's mean of per-frame PSNR, each method gets `psnr_mse`, the PSNR of the MSE averaged
over all generated frames and clips (still frames copied exactly give 100 dB each in TECO's mean,
which inflates the copy baselines), and `per_horizon` curves (PSNR, PSNR of the mean MSE and SSIM
against the generated-frame index; plotted to <out>_horizon.png). `target_exact_repeat_share` says
how many target frames equal their previous frame. The summary compares the model with the
strongest copy baseline by `psnr_mse`, with the spread of that gain over resampled clips (`clip_bootstrap`: a
paired bootstrap, 95% interval), since the seed std does not see how much other clips would move it.

`--protocol` runs TECO's shapes by name (EVAL_PROTOCOLS: teco-fvd = 36 -> 264, teco-psnr = 144 -> 156).
`memory_split` scores every method on the frames a memory of the context could answer and on the rest
(`minisora.memory_split`: an earlier context frame matches the ground truth better than the last one by
more than `memory_margin_db`), with the share of such frames; the split depends on the ground truth only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from minisora.configs import EVAL_PROTOCOLS, EvalConfig
from minisora.context import clip_frames
from minisora.dist import resolve_device
from minisora.errors import MinisoraError, MinisoraWarning, check_writable
from minisora.memory_split import answerable_share, memory_answerable, split_over_seeds, split_scores
from minisora.metrics import (I3DFeatures, clip_bootstrap_gain, exact_repeat_share, frame_errors, frames_to_unit, fvd,
                              horizon_curves, lpips_available, psnr_of_mean_mse, summarize_seeds)
from minisora.pipeline import DiTPipeline
from minisora.run_dir import precision_dtype
from minisora.store import LatentStore
from minisora.store_guard import check_vae


class EvalError(MinisoraError, ValueError):
    """Evaluation options that do not fit the store or the model; the message names the values."""


COPY_BASELINES = ("repeat_last_context_frame", "latent_copy")  # to beat; vae_reconstruction is a ceiling


def resolve_protocol(cfg: EvalConfig, explicit: tuple[str, ...] = ()) -> EvalConfig:
    """`cfg` with the context and frame counts of its named protocol (EVAL_PROTOCOLS); unchanged without one.

    A count that differs from the protocol's is refused when it was given (`explicit` names the fields a
    user set: the CLI knows) or is not the default; the message names both numbers."""
    if cfg.protocol is None:
        return cfg
    if cfg.protocol not in EVAL_PROTOCOLS:
        raise EvalError(f"--protocol {cfg.protocol!r}: unknown; expected one of {', '.join(EVAL_PROTOCOLS)}")
    k, n = EVAL_PROTOCOLS[cfg.protocol]
    default = EvalConfig(checkpoint="", store="")
    for name, want in (("context_frames", k), ("frames", n)):
        got = getattr(cfg, name)
        if got != want and (name in explicit or got != getattr(default, name)):
            raise EvalError(f"--protocol {cfg.protocol} sets --{name.replace('_', '-')} {want} ({k} context -> "
                            f"{n - k} generated latent frames), but --{name.replace('_', '-')} {got} was given: "
                            f"drop one of the two")
    return replace(cfg, context_frames=k, frames=n)


def memory_report(truth: np.ndarray, k_pix: int, margin_db: float, seed_errors: list[dict[str, torch.Tensor]],
                  baseline_errors: dict[str, dict[str, torch.Tensor]]) -> dict:
    """The memory-answerable split (minisora.memory_split) of the generated frames, scored for the model (mean and
    std over seeds) and every baseline, with the share of answerable frames (also at 0 dB, the bare definition)."""
    mask = memory_answerable(truth, k_pix, margin_db)  # (B, T - K) from the ground-truth pixels alone
    return {"definition": f"target frame t is memory-answerable when a context frame j < K-1 has an MSE to it "
                          f"more than {margin_db:g} dB below that of context frame K-1",
            "margin_db": margin_db, "share": answerable_share(mask),
            "share_at_0_db": answerable_share(memory_answerable(truth, k_pix, 0.0)), "frames": int(mask.numel()),
            "model": split_over_seeds(seed_errors, mask),
            "baselines": {name: split_scores(e, mask) for name, e in baseline_errors.items()}}


def select_clips(lengths: np.ndarray, frames: int, num_clips: int, split: str) -> list[int]:
    """The first `num_clips` clips with at least `frames` latent frames; warns (naming both numbers)
    when the split has fewer such clips than asked for."""
    ok = np.flatnonzero(lengths >= frames)
    if len(ok) == 0:
        raise EvalError(f"no clip in {split} has {frames} latent frames (longest: {int(lengths.max())})")
    if len(ok) < num_clips:
        warnings.warn(f"--num-clips {num_clips}: split {split!r} has only {len(ok)} clips with {frames} latent "
                      f"frames; evaluating on {len(ok)}", MinisoraWarning, stacklevel=2)
    return [int(i) for i in ok[:num_clips]]


def score(errors: dict[str, torch.Tensor]) -> dict:
    """One method's numbers from `frame_errors` (B, T): TECO's psnr and ssim (frame mean, then clip mean),
    psnr_mse (PSNR of the mean MSE) and per_horizon curves."""
    return {"psnr": float(errors["psnr"].mean(dim=1).mean()), "ssim": float(errors["ssim"].mean(dim=1).mean()),
            "psnr_mse": psnr_of_mean_mse(errors["mse"]), "per_horizon": horizon_curves(errors)}


def model_summary(per_seed_errors: list[dict[str, torch.Tensor]]) -> tuple[dict, list[dict]]:
    """(model, per_seed): mean and std over seeds of psnr, ssim and psnr_mse; per_horizon over seeds and clips."""
    per_seed = [{k: v for k, v in score(e).items() if k != "per_horizon"} for e in per_seed_errors]
    model = {m: summarize_seeds([s[m] for s in per_seed]) for m in ("psnr", "ssim", "psnr_mse")}
    stacked = {k: torch.stack([e[k] for e in per_seed_errors]) for k in per_seed_errors[0]}  # (S, B, T)
    model["per_horizon"] = horizon_curves(stacked)
    return model, per_seed


def versus_strongest(model: dict, baselines: dict, model_mse: torch.Tensor | None = None,
                     baseline_mse: dict[str, torch.Tensor] | None = None) -> dict:
    """The model against the copy baseline with the highest psnr_mse (not the weakest one); given the per-frame MSEs
    (model (S, B, T) over seeds, each baseline's (B, T)), also the gain's spread over resampled clips."""
    name = max(COPY_BASELINES, key=lambda b: baselines[b]["psnr_mse"])
    b = baselines[name]
    vs = {"name": name, "psnr_mse_gain_db": model["psnr_mse"]["mean"] - b["psnr_mse"],
          "psnr_gain_db": model["psnr"]["mean"] - b["psnr"], "ssim_gain": model["ssim"]["mean"] - b["ssim"],
          "beats_by_more_than_seed_std": model["psnr_mse"]["mean"] - b["psnr_mse"] > model["psnr_mse"]["std"]}
    if model_mse is not None and baseline_mse is not None:
        vs["clip_bootstrap"] = clip_bootstrap_gain(model_mse, baseline_mse[name])
    return vs


def warn_if_ceiling_below_copy(baselines: dict, vae: str) -> None:
    """One MinisoraWarning when the VAE's reconstruction scores below a copy baseline (PSNR of the mean MSE): no
    model that decodes through this VAE can beat copying on these clips."""
    ceiling = baselines["vae_reconstruction"]["psnr_mse"]
    name = max(COPY_BASELINES, key=lambda b: baselines[b]["psnr_mse"])
    if ceiling < baselines[name]["psnr_mse"]:
        warnings.warn(f"{vae}: the VAE's reconstruction ({ceiling:.2f} dB PSNR of the mean MSE) is below {name} "
                      f"({baselines[name]['psnr_mse']:.2f} dB) on these clips, so no model decoding through it can "
                      "beat copying; train a better VAE (minisora vae train reports this check)", MinisoraWarning,
                      stacklevel=2)


def write_horizon_plot(report: dict, path: Path) -> Path:
    """PSNR (TECO), PSNR of the mean MSE and SSIM against the generated-frame index, per method, as a PNG."""
    from minisora.plots import line_panels_png

    methods = {"model": report["model"]["per_horizon"]}
    methods.update({name: b["per_horizon"] for name, b in report["baselines"].items()})
    titles = {"psnr": "PSNR (dB), mean of frames", "psnr_mse": "PSNR (dB) of mean MSE", "ssim": "SSIM"}
    return line_panels_png(path, {t: {m: c[k] for m, c in methods.items()} for k, t in titles.items()})


def _load_clips(cfg: EvalConfig, pipe, store: LatentStore, n_pix: int):
    """The first M clips of the split long enough for N latent frames: (chosen, their manifest paths, ground-truth
    pixels (M, N_pix, H, W, 3) uint8 from the source clips, normalised posterior means (M, N, C, h, w), actions)."""
    chosen = select_clips(store.array(cfg.split, "length")[:], cfg.frames, cfg.num_clips, cfg.split)
    manifest = store.manifest_json()
    split_clips = [c for c in manifest["clips"] if c["split"] == cfg.split]
    truth = np.stack([clip_frames(pipe, Path(manifest["root"]) / split_clips[i]["path"], manifest["kind"])[0][:n_pix]
                      for i in chosen])  # (M, N_pix, H, W, 3) uint8
    means = torch.from_numpy(store.read(cfg.split, "mean", (chosen, slice(0, cfg.frames))).astype(np.float32))
    acts = store.read(cfg.split, "actions", (chosen, slice(0, cfg.frames))).astype(np.int64)
    return chosen, [split_clips[i]["path"] for i in chosen], truth, pipe.normalize_latents(means), acts


def _decode_all(pipe, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([_decode(pipe, latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)])


def _baselines(cfg: EvalConfig, pipe, truth: np.ndarray, latents_gt: torch.Tensor, target: torch.Tensor,
               k_pix: int) -> dict:
    """Per-frame errors (`frame_errors`) of the deterministic baselines on the generated frames: repeat the last
    context frame, decode the last context latent repeated, and the VAE reconstruction of the ground truth (the
    ceiling)."""
    n_pix = truth.shape[1]
    repeat = np.repeat(truth[:, k_pix - 1: k_pix], n_pix - k_pix, axis=1)
    copied = latents_gt.clone()
    k = cfg.context_frames
    copied[:, k:] = latents_gt[:, k - 1: k]  # the last context latent, repeated
    copy, recon = (_decode_all(pipe, x, cfg.batch_size)[:, k_pix:] for x in (copied, latents_gt))
    return {"repeat_last_context_frame": frame_errors(frames_to_unit(repeat), target),
            "latent_copy": frame_errors(frames_to_unit(copy), target),
            "vae_reconstruction": frame_errors(frames_to_unit(recon), target)}


def _generate(cfg: EvalConfig, pipe, latents_gt: torch.Tensor, acts: np.ndarray | None, seed: int, n_pix: int,
              kv_mode: str) -> np.ndarray:
    """The model's continuations of every chosen clip for one seed: uint8 (M, N_pix, H, W, 3)."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for i in range(0, len(latents_gt), cfg.batch_size):
        sl = slice(i, i + cfg.batch_size)
        out = pipe(num_inference_steps=cfg.steps, num_frames=cfg.frames,
                   context_latents=latents_gt[sl, : cfg.context_frames],
                   actions=None if acts is None else torch.from_numpy(acts[sl]), shift=cfg.shift, chunk=cfg.chunk,
                   guidance=cfg.guidance, context_t=cfg.context_noise, sampler=cfg.sampler, sde=cfg.sde,
                   generator=gen, progress=False, kv_cache=kv_mode, compile=cfg.compile)
        frames.append(out.frames)
    return np.concatenate(frames)[:, :n_pix]


def _fvd(cfg: EvalConfig, device, truth: np.ndarray, videos_by_seed: list[np.ndarray], k_pix: int):
    """FVD on full videos with the ground-truth context copied in (TECO), or why it was skipped."""
    if not cfg.i3d:
        return "skipped: pass --i3d PATH (StyleGAN-V's i3d_torchscript.pt) to compute FVD"
    i3d = I3DFeatures(cfg.i3d, device=device)
    real = i3d(truth)
    scores = []
    for videos in videos_by_seed:
        full = videos.copy()
        full[:, :k_pix] = truth[:, :k_pix]
        scores.append(fvd(real, i3d(full)))
    return summarize_seeds(scores)


def main(cfg: EvalConfig) -> dict:
    cfg = resolve_protocol(cfg)
    if not 1 <= cfg.context_frames < cfg.frames:
        raise EvalError(f"--frames {cfg.frames} must exceed --context-frames {cfg.context_frames} (>= 1)")
    check_writable(cfg.out)  # before minutes of sampling, not after
    device = resolve_device(cfg.device)
    pipe = DiTPipeline.from_run(cfg.checkpoint, device, precision_dtype(cfg.precision, device))
    pipe.transformer.set_attention_kernel(cfg.attention_kernel)
    pipe.set_progress_bar_config(disable=True)
    pipe.check_guidance(cfg.guidance)  # before the baselines are computed
    store = LatentStore(cfg.store)
    store.require_complete()
    check_vae(store.attrs.get("vae"), pipe.video_vae.identity(), cfg.store,
              f"the pipeline's VAE ({pipe.video_vae.info.source})")
    store.layout(cfg.split)  # a missing split is a StoreError naming the ones there are
    k_pix, n_pix = pipe.video_vae.pixel_frames(cfg.context_frames), pipe.video_vae.pixel_frames(cfg.frames)
    kv_mode = pipe.kv_cache_mode(cfg.kv_cache, cfg.context_noise)  # noised context: the window cache

    # 1. clips and ground truth; 2. baselines (deterministic, computed once), on generated frames only
    chosen, paths, truth, latents_gt, acts = _load_clips(cfg, pipe, store, n_pix)
    use_actions = pipe.transformer.config.num_actions > 0 and (acts >= 0).all()
    target = frames_to_unit(truth)[:, k_pix:n_pix]
    baseline_errors = _baselines(cfg, pipe, truth, latents_gt, target, k_pix)
    baselines = {name: score(e) for name, e in baseline_errors.items()}
    warn_if_ceiling_below_copy(baselines, pipe.video_vae.info.source)

    # 3. the model, once per seed
    seed_errors, videos_by_seed = [], []
    for seed in range(cfg.seeds):
        videos_by_seed.append(_generate(cfg, pipe, latents_gt, acts if use_actions else None, seed, n_pix, kv_mode))
        seed_errors.append(frame_errors(frames_to_unit(videos_by_seed[-1][:, k_pix:n_pix]), target))
        s = score(seed_errors[-1])
        print(f"    seed {seed}: PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.4f}", flush=True)

    model, per_seed = model_summary(seed_errors)
    report = {"config": asdict(cfg), "clips": paths,
              "num_clips_requested": cfg.num_clips, "num_clips_used": len(chosen),
              "target_exact_repeat_share": exact_repeat_share(truth[:, : n_pix], k_pix),
              "generated_frames_per_clip": n_pix - k_pix, "context_frames_pixels": k_pix,
              "model": model, "per_seed": per_seed, "baselines": baselines,
              "psnr_gain_over_repeat_db": model["psnr"]["mean"] - baselines["repeat_last_context_frame"]["psnr"],
              "ssim_gain_over_repeat": model["ssim"]["mean"] - baselines["repeat_last_context_frame"]["ssim"],
              "vs_strongest_baseline": versus_strongest(model, baselines, torch.stack([e["mse"] for e in seed_errors]),
                                                        {n: e["mse"] for n, e in baseline_errors.items()}),
              "psnr_mse_gain_over_latent_copy_db": model["psnr_mse"]["mean"] - baselines["latent_copy"]["psnr_mse"],
              "use_actions": bool(use_actions),
              "rollout": {"window": pipe.config.window_frames, "chunk": cfg.chunk, "kv_cache": kv_mode,
                          "compiled": cfg.compile, "how": pipe.rollout_line(kv_mode, cfg.compile)},
              "fvd": _fvd(cfg, device, truth, videos_by_seed, k_pix),  # 4. FVD (TECO)
              "memory_split": memory_report(truth[:, :n_pix], k_pix, cfg.memory_margin_db, seed_errors,
                                            baseline_errors),  # 5. frames a memory could answer, and the rest
              "lpips": "skipped: no local LPIPS weights" if not lpips_available() else "available but not computed"}

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["horizon_plot"] = str(write_horizon_plot(report, out.with_name(out.stem + "_horizon.png")))
    out.write_text(json.dumps(report, indent=2))
    return report


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    from minisora.vae import pixels_to_frames

    return pixels_to_frames(pipe.decode_latents(latents.to(pipe.device)))


def format_table(report: dict) -> str:
    """The report as a small text table (mean ± std over seeds for the model)."""
    m, b = report["model"], report["baselines"]
    rows = [("model (continuation)", f"{m['psnr']['mean']:.2f} ± {m['psnr']['std']:.2f}",
             f"{m['ssim']['mean']:.4f} ± {m['ssim']['std']:.4f}"),
            ("repeat last context frame", f"{b['repeat_last_context_frame']['psnr']:.2f}",
             f"{b['repeat_last_context_frame']['ssim']:.4f}"),
            ("VAE reconstruction (ceiling)", f"{b['vae_reconstruction']['psnr']:.2f}",
             f"{b['vae_reconstruction']['ssim']:.4f}"),
            ("copy last context latent", f"{b['latent_copy']['psnr']:.2f}", f"{b['latent_copy']['ssim']:.4f}")]
    lines = [f"{'':<30}{'PSNR (dB)':>16}{'SSIM':>20}"] + [f"{a:<30}{p:>16}{s:>20}" for a, p, s in rows]
    lines.append(f"PSNR of the mean MSE (dB): model {m['psnr_mse']['mean']:.2f} ± {m['psnr_mse']['std']:.2f}, "
                 + ", ".join(f"{name} {b[name]['psnr_mse']:.2f}" for name in b)
                 + f"; {100 * report['target_exact_repeat_share']:.1f}% of target frames repeat their previous one")
    lines.append(f"model vs repeat-last-frame: {report['psnr_gain_over_repeat_db']:+.2f} dB PSNR, "
                 f"{report['ssim_gain_over_repeat']:+.4f} SSIM (TECO's per-frame mean)")
    vs = report["vs_strongest_baseline"]
    if vs["beats_by_more_than_seed_std"]:
        verdict = "beats it by more than the seed std"
    else:
        verdict = "loses to it" if vs["psnr_mse_gain_db"] <= 0 else "within the seed std"
    lines.append(f"model vs the strongest baseline ({vs['name']}): {vs['psnr_mse_gain_db']:+.2f} dB PSNR of mean MSE "
                 f"({verdict}), {vs['psnr_gain_db']:+.2f} dB PSNR, {vs['ssim_gain']:+.4f} SSIM over "
                 f"{len(report['clips'])} clips x {report['generated_frames_per_clip']} generated frames, "
                 f"{report['config']['seeds']} seeds"
                 + (clip_interval(vs["clip_bootstrap"]["ci95_db"]) if "clip_bootstrap" in vs else ""))
    lines += memory_lines(report["memory_split"]) if "memory_split" in report else []
    fv = report["fvd"]
    lines.append(f"FVD: {fv['mean']:.1f} ± {fv['std']:.1f}" if isinstance(fv, dict) else f"FVD: {fv}")
    if "how" in report["rollout"]:
        lines.append(f"rollout: {report['rollout']['how']}, window {report['rollout']['window']}, "
                     f"chunk {report['rollout']['chunk']}")
    return "\n".join(lines)


def clip_interval(ci95: list[float]) -> str:
    """The printed clause of the gain's 95% interval over resampled clips, flagged when it includes 0."""
    lo, hi = ci95
    return f"; 95% interval over resampled clips {lo:+.2f} to {hi:+.2f} dB" + (" (includes 0)" if lo <= 0 <= hi else "")


def _split_cell(scores: dict) -> str:
    """'PSNR of mean MSE (mean PSNR, SSIM)' of one subset, or why there is no number."""
    if scores["psnr_mse"] is None:
        return "n/a (no frames)"
    mean = {k: v["mean"] if isinstance(v, dict) else v for k, v in scores.items()}
    std = f" ± {scores['psnr_mse']['std']:.2f}" if isinstance(scores["psnr_mse"], dict) else ""
    return f"{mean['psnr_mse']:.2f}{std} ({mean['psnr']:.2f}, {mean['ssim']:.3f})"


def memory_lines(split: dict) -> list[str]:
    """The memory-answerable split as table lines: its share, then each method on both subsets."""
    lines = [f"memory-answerable frames: {100 * split['share']:.1f}% of {split['frames']} (an earlier context frame "
             f"beats the last by more than {split['margin_db']:g} dB; {100 * split['share_at_0_db']:.1f}% at 0 dB)",
             f"{'PSNR of mean MSE (PSNR, SSIM)':<30}{'memory-answerable':>32}{'rest':>32}"]
    methods = {"model": split["model"], **split["baselines"]}
    lines += [f"{name:<30}{_split_cell(s['memory']):>32}{_split_cell(s['rest']):>32}" for name, s in methods.items()]
    return lines
