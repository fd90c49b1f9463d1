"""`minisora eval`: TECO-protocol continuation metrics with baselines."""

from __future__ import annotations

import typer

from cli import options
from minisora.configs import EvalConfig, SDEConfig, defaults

E, SDE = defaults(EvalConfig), defaults(SDEConfig)


def evaluate(
    ctx: typer.Context,
    checkpoint: str = typer.Option(..., help="Run, checkpoint or pipeline directory."),
    store: str = typer.Option(..., help="Latent store with the evaluation split (context latents, actions, source "
                              "clips)."),
    split: str = typer.Option(E.split, help="Split to evaluate on."),
    protocol: str = typer.Option(E.protocol, help="TECO's protocol at its own shape, by name: teco-fvd (36 context "
                                 "-> 264 generated, 300 frames: TECO's FVD) or teco-psnr (144 -> 156: its PSNR, SSIM, "
                                 "LPIPS). Sets --context-frames and --frames, and refuses other values of them. Counts "
                                 "are latent frames: TECO's pixel frames when the VAE has no temporal compression, as "
                                 "minisora's."),
    context_frames: int = typer.Option(E.context_frames, min=1,
                                       help="K: latent frames of ground truth given as context."),
    frames: int = typer.Option(E.frames, min=2, help="N: latent frames per video, context included; metrics use frames "
                               "K..N-1."),
    num_clips: int = typer.Option(E.num_clips, min=1,
                                  help="M: the first M clips of the split that have N latent frames "
                                   "(fewer there: a warning, and the report records the number used)."),
    seeds: int = typer.Option(E.seeds, min=1, help="Sampling seeds; the report gives mean and std over them."),
    steps: int = typer.Option(E.steps, min=1, help="Integration steps per window (see --sampler)."),
    shift: float = typer.Option(E.shift, help="Time shift of the sampler (default: the pipeline's)."),
    chunk: int = typer.Option(E.chunk, min=1,
                              help="New latent frames per rollout window, each conditioned on the window - "
                              "chunk frames before them (1: frame by frame)."),
    guidance: float = typer.Option(E.guidance,
                                   help="Classifier-free guidance scale on the clips' recorded actions (1: plain "
                                   "conditional; models trained with actions)."),
    context_noise: float = options.context_noise(E.context_noise),
    sampler: str = options.sampler(E.sampler),
    sde_diffusion: str = options.sde_diffusion(SDE.diffusion),
    sde_norm: float = options.sde_norm(SDE.norm),
    sde_last_step: str = options.sde_last_step(SDE.last_step),
    batch_size: int = typer.Option(E.batch_size, min=1, help="Clips generated per pipeline call."),
    i3d: str = typer.Option(E.i3d,
                            help="StyleGAN-V's I3D TorchScript file (i3d_torchscript.pt) to compute FVD; skipped "
                            "without it."),
    kv_cache: str = options.kv_cache(E.kv_cache),
    no_kv_cache: bool = options.no_kv_cache(),
    attention_kernel: str = options.attention_kernel(E.attention_kernel),
    compile: bool = options.compile_rollout(E.compile),
    device: str = typer.Option(E.device, help="auto, cpu or cuda[:N] (the transformer in bf16 on CUDA)."),
    precision: str = options.transformer_precision(E.precision),
    memory_margin_db: float = typer.Option(E.memory_margin_db, min=0.0,
                                           help="The memory split: a generated frame is memory-answerable when an "
                                           "earlier context frame's MSE to its ground truth is this many dB below "
                                           "the last context frame's (0: any lower MSE, the bare definition)."),
    out: str = typer.Option(E.out, help="Report file (JSON)."),
):
    """PSNR / SSIM (and FVD with --i3d) of continuations on held-out clips, vs repeat-last-frame, latent copy and VAE
    reconstruction; per-horizon curves in the report and a PNG beside it; every method also on the frames a memory
    of the context could answer and on the rest."""
    from minisora.errors import MinisoraError
    from stages.evaluate import EvalConfig, format_table, main, resolve_protocol
    from stages.sample import SampleError
    from minisora import paths

    paths.check_location(checkpoint, "--checkpoint", accepts="a local run, checkpoint or pipeline directory")
    paths.check_store(store)
    paths.check_location(i3d, "--i3d", accepts="a local TorchScript file")
    paths.check_output_file(out)
    try:
        sde = SDEConfig(diffusion=sde_diffusion, norm=sde_norm, last_step=sde_last_step)
    except ValueError as e:
        raise SampleError(str(e)) from e
    cfg = EvalConfig(checkpoint=checkpoint, store=store, split=split, context_frames=context_frames, frames=frames,
                     num_clips=num_clips, seeds=seeds, steps=steps, shift=shift, chunk=chunk, guidance=guidance,
                     batch_size=batch_size, i3d=i3d,
                     context_noise=context_noise, sampler=sampler, sde=sde, precision=precision,
                     device=device, out=out, kv_cache="off" if no_kv_cache else kv_cache,
                     attention_kernel=attention_kernel, protocol=protocol, memory_margin_db=memory_margin_db,
                     compile=compile)
    given = tuple(n for n in ("context_frames", "frames")  # typer's bundled click: compare the source by name
                  if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE")
    try:
        report = main(resolve_protocol(cfg, given))
    except MinisoraError:
        raise  # cli/main.py reports it
    except ValueError as e:  # a bad option value met inside the pipeline
        raise SampleError(str(e)) from e
    typer.echo(format_table(report))
    typer.echo(f"report: {out}")
