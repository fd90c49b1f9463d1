"""`minisora demo`: the whole pipeline on the embedded default (synthetic DMLab, small models)."""

from __future__ import annotations

import typer


def demo(
    out: str = typer.Option("outputs/demo", help="Where every step writes; re-running reuses finished steps."),
    clips: int = typer.Option(48, min=2, help="Synthetic DMLab training clips."),
    test_clips: int = typer.Option(16, min=1, help="Held-out synthetic clips: sampling continues the first, eval uses them all."),
    frames: int = typer.Option(300, min=16, help="Frames per clip (TECO: 300)."),
    vae_minutes: float = typer.Option(3.0, help="Time budget of the VAE training step, in minutes."),
    train_steps: int = typer.Option(5000, min=1, help="DiT training steps (~11 min on 2 CPU cores)."),
    model: str = typer.Option("tiny", help="DiT preset."),
    seed: int = typer.Option(0, help="Seed of data, VAE, DiT and samples."),
):
    """Run data synth -> manifest -> vae train -> encode -> store verify -> train -> sample -> eval."""
    from stages.demo import DemoConfig, main

    main(DemoConfig(out=out, clips=clips, test_clips=test_clips, eval_clips=test_clips, frames=frames, vae_minutes=vae_minutes, train_steps=train_steps, model=model, seed=seed))
