"""`minisora` command line: one typer sub-app or command per stage, each in its own module."""

from __future__ import annotations

import typer

from cli import data, demo, encode, evaluate, sample, store, train, vae

app = typer.Typer(
    name="minisora",
    help="Train Sora-style video DiTs on cached VAE latents: data -> encode -> train -> sample.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data.app, name="data", help="Clip sources: synthetic TECO-layout data, manifests, TECO downloads.")
app.add_typer(vae.app, name="vae", help="VAEs: train a small offline AutoencoderKL, inspect any diffusers VAE.")
app.command(name="encode")(encode.encode)
app.add_typer(store.app, name="store", help="Latent stores: info and verify.")
app.command(name="train")(train.train)
app.command(name="sample")(sample.sample)
app.command(name="eval")(evaluate.evaluate)
app.command(name="demo")(demo.demo)


if __name__ == "__main__":
    app()
