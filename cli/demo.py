"""`minisora demo`: the whole pipeline on the embedded default (synthetic DMLab, small models)."""

from __future__ import annotations

import typer

from stages.demo import RECIPES, DemoConfig

D = DemoConfig()  # each option's default is its DemoConfig field's (stages/demo.py, planned in docs/benchmarks.md)


def _per_data(field: str) -> str:
    """'32 for dmlab, 64 for doom': a recipe field's value for each --data (stages.demo.RECIPES)."""
    return ", ".join(f"{getattr(recipe, field)} for {data}" for data, recipe in RECIPES.items())


def demo(
    out: str = typer.Option(D.out, help="Where every step writes; re-running reuses finished steps."),
    data: str = typer.Option(D.data, help="dmlab: synthetic first-person maze clips (the default); doom: frames of "
                             "a real game engine, ViZDoom on Freedoom levels, 64x64 (needs pip install "
                             "'minisora[doom]', which make setup installs)."),
    clips: int = typer.Option(D.clips, min=2, help=f"Training clips (default: {_per_data('clips')})."),
    test_clips: int = typer.Option(D.test_clips, min=1, help="Held-out clips: sampling continues the first, eval "
                                   f"uses the first EVAL_CLIPS of them (default: {_per_data('test_clips')})."),
    eval_clips: int = typer.Option(D.eval_clips, min=1, help="Held-out clips evaluated (default: all TEST_CLIPS)."),
    frames: int = typer.Option(D.frames, min=16, help="Frames per clip (TECO: 300)."),
    vae_steps: int = typer.Option(D.vae_steps, min=1, help="VAE training steps (a step count, never minutes: "
                                  f"the same seed gives the same VAE on any machine; default: "
                                  f"{_per_data('vae_steps')})."),
    vae_width: int = typer.Option(D.vae_width, min=8, help="Channels of the VAE's first level (multiple of 8)."),
    train_steps: int = typer.Option(D.train_steps, min=1, help="DiT training steps."),
    batch_size: int = typer.Option(D.batch_size, min=1, help="DiT training windows per step."),
    window: int = typer.Option(D.window, min=2, help="Latent frames per DiT training window."),
    patch_size: int = typer.Option(D.patch_size, min=1, help="DiT spatial patch size (4: 16 tokens per 16x16 "
                                   "latent frame)."),
    model: str = typer.Option(D.model, help="DiT preset."),
    attention: str = typer.Option(D.attention, help="DiT attention: causal (a frame sees itself and earlier "
                                  "frames; sampling uses a KV cache) or full (bidirectional in the window)."),
    precision: str = typer.Option(D.precision, help="auto (bf16 only where the hardware computes it natively: "
                                  "CUDA, or a CPU with AMX or AVX512-BF16; fp32 otherwise), fp32 or bf16; "
                                  "every stage uses the one choice, printed at the start."),
    seed: int = typer.Option(D.seed, help="Seed of data, VAE, DiT and samples."),
):
    """Run data synth -> manifest -> vae train -> encode -> store verify -> train -> sample -> eval.

    Prints the CPU's model, capability and the precision first, and the total wall time last.

    Sized for `make demo` within 20 minutes on a 2-core AVX2-only CPU in fp32 (docs/benchmarks.md).
    """
    from minisora import paths
    from stages.demo import DATA_TITLES, main

    paths.check_output_dir(out)
    if precision not in ("auto", "fp32", "bf16"):
        raise typer.BadParameter(f"{precision!r}: choose auto, fp32 or bf16", param_hint="--precision")
    if data not in DATA_TITLES:
        raise typer.BadParameter(f"{data!r}: choose {' or '.join(DATA_TITLES)}", param_hint="--data")
    if attention not in ("causal", "full"):
        raise typer.BadParameter(f"{attention!r}: choose causal or full", param_hint="--attention")
    if vae_width % 8:
        raise typer.BadParameter(f"{vae_width} is not a multiple of 8", param_hint="--vae-width")
    main(DemoConfig(out=out, data=data, clips=clips, test_clips=test_clips, eval_clips=eval_clips,
                    frames=frames, vae_steps=vae_steps, vae_width=vae_width,
                    train_steps=train_steps, batch_size=batch_size,
                    window=window, patch_size=patch_size, model=model, attention=attention, precision=precision,
                    seed=seed))
