"""`minisora play`: drive a trained causal world model live from the keyboard, in a browser."""

from __future__ import annotations

import typer

from cli import options
from minisora.configs import PlayConfig, defaults

P = defaults(PlayConfig)


def play(
    checkpoint: str = typer.Option(..., help="A run directory (newest checkpoint), a checkpoint directory, or a "
                                   "pipeline directory, of a model trained with --attention causal."),
    store: str = typer.Option(P.store, help="Latent store of the context clip (default: the store the run was "
                              "trained on, as its pipeline records it)."),
    clip: str = typer.Option(P.clip, help="SPLIT:INDEX of the context clip in --store, e.g. test:3."),
    context: str = typer.Option(P.context, help="Start from this TECO clip file (.npz DMLab / .mp4 Minecraft) "
                                "instead of a store clip."),
    context_frames: int = typer.Option(P.context_frames, min=1, help="Latent frames of the clip the model starts "
                                       "from (kept clean, t = 0)."),
    steps: int = typer.Option(P.steps, min=1, help="Euler steps per frame (the page can change it while playing)."),
    shift: float = typer.Option(P.shift, help="Time shift t' = s t / (1 + (s - 1) t) (default: the pipeline's)."),
    seed: int = typer.Option(P.seed, help="Noise seed; reset restarts it, so the same keys replay the same frames."),
    device: str = typer.Option(P.device, help="auto (cuda if available), cpu, cuda[:N]."),
    precision: str = typer.Option(P.precision, help="Transformer dtype: auto (fp32 on a CPU, where it played faster "
                                  "than bf16; bf16 on CUDA), fp32, bf16, fp16. The VAE stays fp32."),
    threads: int = typer.Option(P.threads, min=1, help="torch CPU threads of the generator (1 leaves a core to the "
                                "browser and the server)."),
    attention_kernel: str = options.attention_kernel(P.attention_kernel),
    compile: bool = options.compile_rollout(P.compile),
    host: str = typer.Option(P.host, help="Address to serve the page on (127.0.0.1: this machine only)."),
    port: int = typer.Option(P.port, min=0, max=65535, help="Port to serve on (0: a free one; the address is "
                             "printed)."),
    record_dir: str = typer.Option(P.record_dir, help="Where the record button writes sessions, as a TECO root: "
                                   "RECORD_DIR/test/0000/NNNNN.npz (video, actions) and .mp4."),
):
    """Serve a page that plays the model live: hold keys to act, one generated frame per step.

    The page shows the current frame, the context it started from, the action the frame was conditioned
    on, frames per second and latency; it can reset to the context, change the Euler steps and record
    the session as a clip that `minisora data manifest` accepts.
    """
    from minisora import paths
    from stages.play import main

    paths.check_location(checkpoint, "--checkpoint", accepts="a local run, checkpoint or pipeline directory")
    paths.check_store(store)
    paths.check_location(context, "--context", accepts="a local clip file (.npz / .mp4)")
    paths.check_location(record_dir, "--record-dir", accepts="a local directory")
    if context and store:
        raise typer.BadParameter("give --context CLIP_FILE or --store STORE --clip SPLIT:INDEX, not both",
                                 param_hint="--context")
    main(PlayConfig(checkpoint=checkpoint, store=store, clip=clip, context=context, context_frames=context_frames,
                    steps=steps, shift=shift, seed=seed, device=device, precision=precision, threads=threads,
                    attention_kernel=attention_kernel, compile=compile, host=host, port=port,
                    record_dir=record_dir))
