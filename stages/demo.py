"""The whole pipeline on the embedded default: synthetic DMLab -> VAE -> store -> DiT -> samples -> eval.

`--data doom` runs it on frames of a real game engine instead (ViZDoom, 64x64, `data synth --kind doom`).

`make demo` (or `minisora demo`) runs it. Every step writes under OUT and is skipped (or resumed)
when its output is already there, so a second run reuses what the first one did.

Every training step is bounded by a step count, never by minutes, so the printed numbers depend
only on the seed, the torch version and the precision (printed first: `--precision auto` picks
bf16 only on hardware that computes it natively, fp32 elsewhere). The sizes are planned for a
2-core AVX2-only CPU in fp32 (docs/benchmarks.md, "The demo's budget").
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from minisora.configs import EncodeConfig, TrainConfig, VAETrainConfig, defaults
from minisora.errors import MinisoraError


TRAIN, VAE, ENCODE = defaults(TrainConfig), defaults(VAETrainConfig), defaults(EncodeConfig)


@dataclass
class DemoConfig:
    """The demo's sizes; every other setting is its stage's default, or overridden in main() with its reason."""

    out: str = "outputs/demo"
    data: str = "dmlab"  # dmlab: the synthetic maze; doom: ViZDoom frames at 64x64 (needs the doom extra)
    clips: int | None = None  # training clips; None: the data's recipe (RECIPES)
    test_clips: int | None = None  # held-out clips for sampling and eval; None: the data's recipe (RECIPES)
    frames: int = 300  # frames per clip, as TECO
    frame_stride: int = ENCODE.frame_stride  # every frame, as TECO (stride 2 doubles the motion between latent frames)
    seed: int = TRAIN.seed
    vae_steps: int | None = None  # None: the data's recipe (RECIPES); `vae train` defaults to 3000
    vae_width: int = VAE.width  # channels of the VAE's first level
    model: str = TRAIN.model
    attention: str = TRAIN.attention  # frame-causal, rolled out with a KV cache (docs/design-notes.md: why)
    patch_size: int = 4  # 16 tokens per 16x16 latent frame: 4x cheaper steps than patch 2 on 2 CPU cores
    window: int = TRAIN.frames  # latent frames per training window
    train_steps: int = 2800
    batch_size: int = 2  # teacher forcing doubles a window's tokens: 2 windows cost what 4 did without it
    eval_clips: int | None = None  # held-out clips evaluated (the first ones); None: all test_clips
    precision: str = TRAIN.precision  # minisora.hardware.resolve_precision: bf16 only where computed natively
    workers: int = 2


@dataclass(frozen=True)
class DataRecipe:
    """The settings of the demo that depend on --data, each measured on its data (docs/design-notes.md: the
    recipe studies). Both fit the 2-core AVX2 budget (docs/benchmarks.md)."""

    clips: int  # training clips (DemoConfig.clips when that is None)
    test_clips: int  # held-out clips, all evaluated (DemoConfig.test_clips and eval_clips when None)
    vae_steps: int  # VAE training steps (DemoConfig.vae_steps when that is None)
    lr: float  # the tiny DiT's peak learning rate
    sample_steps: int  # Euler steps per window, in sample and eval
    context_noise: float  # noise level of the known frames when eval samples (training draws U(0, 0.1))


RECIPES = {
    # the maze: 600 VAE steps for its 2-core AVX2 budget; 1e-3 the tiny DiT's rate in the recipe study; 5 Euler
    # steps beat 20 on both synthetic families; its gain over copying clears 0 on 16 held-out clips
    "dmlab": DataRecipe(clips=32, test_clips=16, vae_steps=600, lr=1e-3, sample_steps=5, context_noise=0.0),
    # Doom (its recipe study): 300 VAE steps still clear copying by 4.4 dB, and their time renders and encodes 32
    # more clips (the model's largest gain at the 12th frame); 2e-3 and the context seen at noise level 0.05 each
    # beat the maze's choice there; sample and eval then roll out with the window cache. Its gain is within what
    # the choice of 16 clips moves (a 95% interval ~1.9 dB wide): 64 held-out clips narrow it ~2x, and on them one
    # Euler step (the network's guess of the mean next frame) beats the 2 that 16 clips had picked, on all 6 models
    # tried. (Training times centred nearer t = 1, where that step reads the network, lift 4 -> 12, lose 36 -> 100.)
    "doom": DataRecipe(clips=64, test_clips=64, vae_steps=300, lr=2e-3, sample_steps=1, context_noise=0.05),
}


def with_recipe(cfg: DemoConfig) -> DemoConfig:
    """`cfg` with its None fields (clips, test_clips, vae_steps) taken from its data's recipe, and eval_clips
    (None: all test clips) at most test_clips."""
    recipe = RECIPES[cfg.data]
    test_clips = recipe.test_clips if cfg.test_clips is None else cfg.test_clips
    return replace(cfg, clips=recipe.clips if cfg.clips is None else cfg.clips, test_clips=test_clips,
                   eval_clips=min(cfg.eval_clips or test_clips, test_clips),
                   vae_steps=recipe.vae_steps if cfg.vae_steps is None else cfg.vae_steps)


def _step(title: str) -> float:
    print(f"\n==> {title}", flush=True)
    return time.time()


def _done(t0: float, what: str) -> None:
    print(f"    {what} ({time.time() - t0:.0f}s)", flush=True)


class Paths(NamedTuple):
    """Where each step writes, under the demo's --out."""

    out: Path
    data: Path
    manifest: Path
    vae: Path
    store: Path
    run: Path

    @classmethod
    def under(cls, out: Path) -> "Paths":
        return cls(out, out / "data", out / "manifest.json", out / "vae", out / "store", out / "run")


# The settings each reusable step's output depends on (its own and those of the steps before it), and the file
# whose presence means the step is done. A re-run that changes one of them for a finished step is refused: the
# step would be reused, silently ignoring the new value.
_DATA = ("data", "clips", "test_clips", "frames", "seed")
STEP_SETTINGS = {
    "data": ("data", _DATA),
    "vae": ("vae/config.json", _DATA + ("vae_steps", "vae_width", "resolved_precision")),
    "store": ("store/zarr.json", _DATA + ("vae_steps", "vae_width", "resolved_precision", "frame_stride")),
    "run": ("run/checkpoints", _DATA + ("vae_steps", "vae_width", "resolved_precision", "frame_stride", "model",
                                       "attention", "patch_size", "window", "batch_size", "recipe.lr")),
}


def _setting(record: dict, key: str):
    """A recorded setting, "recipe.lr" from the recorded recipe; None where an older record lacks it."""
    if key.startswith("recipe."):
        return record.get("recipe", {}).get(key.split(".", 1)[1])
    return record.get(key)


def _spelled(key: str) -> str:
    return f"the recipe's {key.split('.', 1)[1]}" if key.startswith("recipe.") else f"--{key.replace('_', '-')}"


class DemoError(MinisoraError, ValueError):
    """A re-run of the demo whose settings differ from those its finished steps were made with."""


def check_reuse(paths: Paths, settings: dict) -> None:
    """Refuse, before any step runs, settings that differ from those of a finished step under OUT
    (recorded in OUT/demo_config.json by the run that made it)."""
    recorded = paths.out / "demo_config.json"
    if not recorded.is_file():
        return
    try:
        old = json.loads(recorded.read_text())
    except (OSError, ValueError) as e:
        raise DemoError(f"{recorded}: unreadable record of the demo's settings ({e}); choose a new --out") from e
    for step, (marker, keys) in STEP_SETTINGS.items():
        if not (paths.out / marker).exists():
            continue
        diff = [k for k in keys if _setting(old, k) is not None and _setting(old, k) != _setting(settings, k)]
        if diff:
            what = ", ".join(f"{_spelled(k)} {_setting(old, k)} there, {_setting(settings, k)} now" for k in diff)
            raise DemoError(f"{paths.out / marker.split('/')[0]}: the {step} step was made with other settings "
                            f"({what}); it would be reused as it is: repeat those settings, choose a new --out, "
                            f"or delete {paths.out / marker.split('/')[0]} to redo it")


DATA_TITLES = {"dmlab": "synthetic DMLab", "doom": "ViZDoom (Freedoom levels, walk)"}  # what --data may name


def make_data(cfg: DemoConfig, paths: Paths) -> None:
    from minisora.data.manifest import build_manifest
    from minisora.data.synthetic import write_synthetic_dataset

    t0 = _step(f"1/8 {DATA_TITLES[cfg.data]} clips -> {paths.data}")
    stats = write_synthetic_dataset(cfg.data, paths.data, clips=cfg.clips, test_clips=cfg.test_clips,
                                    frames=cfg.frames, seed=cfg.seed, workers=cfg.workers)
    _done(t0, f"{stats['clips']} clips ready")
    t0 = _step(f"2/8 manifest -> {paths.manifest}")
    manifest, _ = build_manifest(paths.data, "dmlab")  # doom clips are written in DMLab's layout
    manifest.save(paths.manifest)
    _done(t0, f"{len(manifest.clips)} clips {manifest.split_counts()}")


def train_vae(cfg: DemoConfig, paths: Paths, precision: str) -> None:
    t0 = _step(f"3/8 train the offline VAE -> {paths.vae}")
    if (paths.vae / "config.json").exists():
        _done(t0, "reusing the trained VAE")
        return
    from stages.vae_train import main as vae_main

    info = vae_main(VAETrainConfig(manifest=str(paths.manifest), out=str(paths.vae), steps=cfg.vae_steps,
                                   width=cfg.vae_width, precision=precision, seed=cfg.seed,
                                   eval_every=cfg.vae_steps))  # one held-out PSNR, at the end
    _done(t0, f"held-out PSNR {info['test_psnr']:.2f} dB "
              f"(mean-frame baseline {info['mean_frame_baseline_psnr']:.2f} dB)")


def encode_and_verify(cfg: DemoConfig, paths: Paths) -> None:
    from minisora.store import LatentStore
    from stages.encode import main as encode_main

    t0 = _step(f"4/8 encode every frame once -> {paths.store}")
    if (paths.store / "zarr.json").exists() and LatentStore(paths.store).attrs.get("complete"):
        _done(t0, "reusing the complete store")
    else:
        encode_main(EncodeConfig(manifest=str(paths.manifest), vae=str(paths.vae), out=str(paths.store),
                                 frame_stride=cfg.frame_stride,
                                 clips_per_shard=8))  # a clip is 0.6 MB of latents: ~32 MB shards would be one
        _done(t0, "store complete")
    t0 = _step("5/8 verify the store")
    problems = LatentStore(paths.store).verify()
    if problems:
        raise RuntimeError("store verify failed:\n" + "\n".join(problems))
    info = LatentStore(paths.store).info()
    tr = info["splits"]["train"]
    _done(t0, f"ok: {tr['clips']} train clips, {tr['bytes_per_frame']:.0f} B/latent frame vs "
              f"{info['raw_pixel_bytes_per_latent_frame']} B of raw pixels")


def train_dit(cfg: DemoConfig, paths: Paths, precision: str) -> None:
    from stages.train import main as train_main

    t0 = _step(f"6/8 train a {cfg.model} DiT on the latents -> {paths.run}")
    # train's recipe, with the study's mix for steps without teacher forcing (those of --attention full)
    flow = replace(TRAIN.flow, p_full=0.2, p_prefix=0.6)  # and p_independent 0.2
    res = train_main(TrainConfig(
        store=str(paths.store), out=str(paths.run), model=cfg.model, attention=cfg.attention,
        patch_size=cfg.patch_size, frames=cfg.window, batch_size=cfg.batch_size, steps=cfg.train_steps,
        seed=cfg.seed, flow=flow, precision=precision,
        lr=RECIPES[cfg.data].lr,
        ema_decay=0.995,  # 0.999 over 2800 steps still averages in early weights: -0.95 dB in the recipe study
        use_actions=True,  # the clips (maze or Doom) record their actions; continuations follow them
        ckpt_every=250, keep_last=2,  # a killed demo loses at most 250 steps; two checkpoints on disk
        log_every=25))  # ~100 loss points over the demo's 2800 steps
    if math.isnan(res["loss"]):  # resumed at its last step: no step ran to give a loss
        _done(t0, f"step {res['step']}, already trained")
    else:
        _done(t0, f"step {res['step']}, loss {res['loss']:.4f}")


def sample_videos(cfg: DemoConfig, paths: Paths, precision: str) -> list[str]:
    from stages.sample import SampleConfig, main as sample_main

    t0 = _step("7/8 sample: a continuation of a held-out clip and an unconditional video")
    cont = sample_main(SampleConfig(checkpoint=str(paths.run), out=str(paths.out / "samples" / "continuation"),
                                    context=f"{paths.store}:test:0",
                                    # the recorded actions end with the clip: at most its latent frames
                                    frames=min(3 * cfg.window, cfg.frames // cfg.frame_stride),
                                    actions="context", seed=cfg.seed, steps=RECIPES[cfg.data].sample_steps,
                                    context_noise=RECIPES[cfg.data].context_noise, precision=precision))
    uncond = sample_main(SampleConfig(checkpoint=str(paths.run), out=str(paths.out / "samples" / "unconditional"),
                                      num_videos=2, frames=2 * cfg.window, seed=cfg.seed,
                                      steps=RECIPES[cfg.data].sample_steps,
                                      context_noise=RECIPES[cfg.data].context_noise, precision=precision))
    written = cont["written"] + uncond["written"]
    _done(t0, f"{len(written)} files")
    return written


def evaluate(cfg: DemoConfig, paths: Paths, precision: str) -> str:
    from stages.evaluate import EvalConfig, format_table, main as eval_main

    t0 = _step("8/8 evaluate continuations on held-out clips (TECO protocol)")
    report = eval_main(EvalConfig(checkpoint=str(paths.run), store=str(paths.store), frames=2 * cfg.window,
                                  num_clips=cfg.eval_clips, out=str(paths.out / "eval.json"),
                                  steps=RECIPES[cfg.data].sample_steps,
                                  context_noise=RECIPES[cfg.data].context_noise, precision=precision,
                                  seeds=2))  # a mean and a spread at two thirds of eval's 3 seeds
    print(format_table(report))
    _done(t0, "report written")
    return str(paths.out / "eval.json")


def main(cfg: DemoConfig) -> dict:
    from minisora.dist import resolve_device
    from minisora.hardware import cpu_facts, cpu_model, resolve_precision

    t_start = time.time()
    device = resolve_device("auto")  # where the VAE, sampling and eval run (train picks the same)
    choice = resolve_precision(cfg.precision, device)
    print(f"minisora demo on {device.type}, {cpu_facts().describe()} ({cpu_model()}), torch {_torch_version()}\n"
          f"{choice.line()}", flush=True)
    precision = choice.precision  # the concrete value every stage gets: fp32 or bf16
    if cfg.data == "doom":  # without vizdoom: how to install it, before anything is written
        from minisora.data.synthetic.doom import import_vizdoom

        import_vizdoom()
    cfg = with_recipe(cfg)
    paths = Paths.under(Path(cfg.out))
    settings = asdict(cfg) | {"resolved_precision": precision, "recipe": asdict(RECIPES[cfg.data])}
    check_reuse(paths, settings)  # before anything is written, demo_config.json included
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "demo_config.json").write_text(json.dumps(settings, indent=2))
    make_data(cfg, paths)
    train_vae(cfg, paths, precision)
    encode_and_verify(cfg, paths)
    train_dit(cfg, paths, precision)
    results = {"samples": sample_videos(cfg, paths, precision), "eval": evaluate(cfg, paths, precision)}

    print(f"\nDone. Outputs in {paths.out}/:")
    for k in ("data", "manifest.json", "vae", "store", "run", "samples", "eval.json"):
        if (paths.out / k).exists():
            print(f"  {paths.out / k}")
    total = time.time() - t_start
    print(f"Total wall time {total / 60:.1f} min ({total:.0f}s) with {choice.precision} on {cpu_facts().describe()}")
    results["seconds"] = total
    return results


def _torch_version() -> str:
    import torch

    return torch.__version__
