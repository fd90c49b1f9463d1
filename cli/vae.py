"""`minisora vae ...`: train the small offline AutoencoderKL; inspect any supported diffusers VAE."""

from __future__ import annotations

import json
from dataclasses import asdict
from enum import Enum
from pathlib import Path

import typer

from minisora.configs import VAETrainConfig, defaults

app = typer.Typer(no_args_is_help=True)
V = defaults(VAETrainConfig)  # every `vae train` option's default is its VAETrainConfig field's


class Loss(str, Enum):
    l1 = "l1"
    mse = "mse"


@app.command()
def train(
    manifest: Path = typer.Option(..., exists=True, dir_okay=False, help="Clip manifest written by `minisora data "
                                  "manifest`; trains on its train split, reports PSNR on its test split."),
    out: Path = typer.Option(..., help="Directory to write the model to (diffusers save_pretrained: config.json + "
                             "safetensors) and train_info.json."),
    steps: int = typer.Option(V.steps, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(V.batch_size, min=1, help="Frames per step, drawn at random from the clips held in "
                                   "RAM."),
    latent_channels: int = typer.Option(V.latent_channels, min=1, help="Channels of the latent."),
    downsample: int = typer.Option(V.downsample, help="Spatial compression: 4 (64x64 frames -> 16x16 latents) or 8."),
    width: int = typer.Option(V.width, min=8, help="Channels of the first level (multiple of 8), doubling per level up "
                              "to 4x: 16 gives (16, 32, 64), 0.68M parameters at 4x."),
    lr: float = typer.Option(V.lr, min=0.0, help="Adam learning rate (constant)."),
    kl_weight: float = typer.Option(V.kl_weight, min=0.0, help="Weight of the KL term against the reconstruction term "
                                    "(both summed per frame, as in LDM)."),
    loss: Loss = typer.Option(Loss(V.loss), help="Reconstruction loss."),
    device: str = typer.Option(V.device, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option(V.precision, help="Autocast of the training step: auto (bf16 only where the device "
                                  "computes it natively: CUDA, or a CPU with AMX or AVX512-BF16; fp32 otherwise), "
                                  "fp32, bf16, fp16."),
    channels_last: bool = typer.Option(V.channels_last, "--channels-last/--no-channels-last",
                                       help="NHWC activations and weights (oneDNN's native conv layout on CPU)."),
    threads: int = typer.Option(V.threads, min=1, help="torch CPU threads (default: one per core); use 1 when other "
                                "jobs share the cores (oversubscribed threads are many times slower)."),
    seed: int = typer.Option(V.seed, help="Seed of initialisation and frame sampling."),
    max_minutes: float = typer.Option(V.max_minutes, min=0.0, help="Stop after this many minutes of training (and "
                                      "save) even if STEPS are not done. Off by default: with it the model depends on "
                                      "the machine's speed and load, not only on the seed."),
    pool_clips: int = typer.Option(V.pool_clips, min=1, help="Whole training clips held in RAM to draw frames from."),
    refresh_every: int = typer.Option(V.refresh_every, min=1, help="Steps between swapping one clip in RAM for another "
                                      "training clip."),
    eval_frames: int = typer.Option(V.eval_frames, min=1, help="Held-out frames for PSNR, spread evenly over the test "
                                    "clips."),
    eval_every: int = typer.Option(V.eval_every, min=1, help="Steps between held-out PSNR measurements (also done at "
                                   "the end)."),
    overwrite: bool = typer.Option(V.overwrite, "--overwrite", help="Replace a model already in OUT."),
):
    """Train a small AutoencoderKL from scratch on a manifest's frames: the offline default VAE.

    Not resumable (minutes on a CPU): re-run the same command to get the same model.
    """
    options = dict(locals())  # the options by name, each a VAETrainConfig field
    from minisora.data.clips import ClipError
    from minisora.data.manifest import ManifestError
    from minisora import paths
    from stages.vae_train import VAETrainError, main

    paths.check_output_dir(out)  # before minutes of training, not after
    if downsample not in (4, 8):
        raise typer.BadParameter("must be 4 or 8", param_hint="--downsample")
    if width % 8:
        raise typer.BadParameter("must be a multiple of 8", param_hint="--width")
    cfg = VAETrainConfig(**options | {"manifest": str(manifest), "out": str(out), "loss": loss.value})
    try:
        main(cfg)
    except (VAETrainError, ManifestError, ClipError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def info(
    vae: str = typer.Argument(..., help="A local diffusers model directory or a Hub id (e.g. "
                              "stabilityai/sd-vae-ft-ema)."),
    subfolder: str = typer.Option(None, "--subfolder", "--vae-subfolder", help="Subfolder of the VAE inside the "
                                  "directory/repo (e.g. 'vae' for a pipeline)."),
    revision: str = typer.Option(None, "--revision", "--vae-revision", help="Hub revision (branch, tag or commit)."),
):
    """Load a VAE and print what a latent store would record about it (JSON), plus its parameter count."""
    from minisora import paths
    from minisora.vae import VAEError, VideoVAE

    paths.check_vae(vae)
    try:
        model = VideoVAE.load(vae, subfolder=subfolder, revision=revision)
    except VAEError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1)
    record = asdict(model.info) | {"parameters": sum(p.numel() for p in model.model.parameters())}
    typer.echo(json.dumps(record, indent=2))
