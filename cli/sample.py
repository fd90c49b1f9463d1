"""`minisora sample`: generate, continue and roll out videos with a trained pipeline."""

from __future__ import annotations

import typer

from cli import options
from minisora.configs import SampleConfig, SDEConfig, defaults

S, SDE = defaults(SampleConfig), defaults(SDEConfig)


def sample(
    checkpoint: str = typer.Option(..., help="A run directory (newest checkpoint), a checkpoint directory, or a "
                                   "pipeline directory."),
    out: str = typer.Option(..., help="Output path without or with extension (OUT.mp4 / OUT.gif); several videos get "
                            "-00, -01 ..."),
    num_videos: int = typer.Option(S.num_videos, min=1, help="Videos generated in one batch."),
    frames: int = typer.Option(S.frames, min=1,
                               help="Latent frames per video, context included (= video frames for image "
                               "VAEs); more than the training window rolls out window by window (e.g. 300) (default: "
                               "the training window)."),
    steps: int = typer.Option(S.steps, min=1, help="Integration steps per window (see --sampler)."),
    shift: float = typer.Option(S.shift,
                                help="Time shift t' = s t / (1 + (s - 1) t); > 1 spends more steps at high noise "
                                "(default: the pipeline's)."),
    seed: int = typer.Option(S.seed, help="Noise seed (same seed, same checkpoint: same video)."),
    device: str = typer.Option(S.device,
                               help="auto (cuda if available), cpu, cuda[:N]. On CUDA the transformer runs in "
                               "bf16, the VAE in fp32."),
    precision: str = options.transformer_precision(S.precision),
    context: str = typer.Option(S.context, help="Continue this clip: a TECO .npz / .mp4 file, or a store reference "
                                "STORE:SPLIT:INDEX (e.g. outputs/demo/store:test:3)."),
    context_frames: int = typer.Option(S.context_frames, min=1,
                                       help="Latent frames of the context clip kept clean (t = 0)."),
    actions: str = typer.Option(S.actions,
                                help="'context' (the context clip's recorded actions), a .npz/.npy file with "
                                "`actions`, or omit for none."),
    guidance: float = typer.Option(S.guidance,
                                   help="Classifier-free guidance scale on actions (1: plain conditional)."),
    context_noise: float = options.context_noise(S.context_noise),
    chunk: int = typer.Option(S.chunk, min=1,
                              help="New latent frames per rollout window, each conditioned on the window - "
                              "chunk frames before them (1: frame by frame; larger: fewer windows, faster; "
                              "docs/design-notes.md compares them)."),
    sampler: str = options.sampler(S.sampler),
    sde_diffusion: str = options.sde_diffusion(SDE.diffusion),
    sde_norm: float = options.sde_norm(SDE.norm),
    sde_last_step: str = options.sde_last_step(SDE.last_step),
    kv_cache: str = options.kv_cache(S.kv_cache),
    no_kv_cache: bool = options.no_kv_cache(),
    attention_kernel: str = options.attention_kernel(S.attention_kernel),
    compile: bool = options.compile_rollout(S.compile),
    format: str = typer.Option(",".join(S.formats),
                               help="Comma-separated outputs: mp4, gif (context frames framed in red), npz "
                               "(unmarked frames + latents)."),
    fps: float = typer.Option(S.fps, help="Frames per second of the written videos (default: the dataset's)."),
):
    """Generate videos: unconditional, continuation of a clip, and rollouts longer than the training window.

    With --context, also writes OUT-vs-truth.mp4/gif: ground truth | generation, context frames framed in red.
    """
    from minisora import paths
    from minisora.errors import MinisoraError
    from stages.sample import SampleConfig, SampleError, main

    paths.check_location(checkpoint, "--checkpoint", accepts="a local run, checkpoint or pipeline directory")
    paths.check_context(context)
    if actions and actions != "context":
        paths.check_location(actions, "--actions", accepts="'context' or a local .npz/.npy file")
    paths.check_output_stem(out)  # OUT is a stem: OUT.mp4, OUT-vs-truth.gif, ...
    formats = tuple(f.strip() for f in format.split(",") if f.strip())
    bad = [f for f in formats if f not in ("mp4", "gif", "npz")]
    if bad:
        raise typer.BadParameter(f"unknown format(s) {bad}; use mp4, gif, npz", param_hint="--format")
    try:
        sde = SDEConfig(diffusion=sde_diffusion, norm=sde_norm, last_step=sde_last_step)
    except ValueError as e:
        raise SampleError(str(e)) from e
    cfg = SampleConfig(checkpoint=checkpoint, out=out, num_videos=num_videos, frames=frames, steps=steps, shift=shift,
                       seed=seed, device=device, precision=precision,
                       context=context, context_frames=context_frames, actions=actions,
                       guidance=guidance, context_noise=context_noise, formats=formats, chunk=chunk, fps=fps,
                       kv_cache="off" if no_kv_cache else kv_cache, attention_kernel=attention_kernel,
                       sampler=sampler, sde=sde, compile=compile)
    try:
        result = main(cfg)
    except MinisoraError:
        raise  # cli/main.py reports it
    except ValueError as e:  # a bad option value met inside the pipeline
        raise SampleError(str(e)) from e
    typer.echo(f"rollout: {result['rollout']}")
    typer.echo(f"{result['videos']} video(s) of {result['frames']} frames:")
    for path in result["written"]:
        typer.echo(f"  {path}")
