"""`minisora` command line: one typer sub-app or command per stage, each in its own module."""

from __future__ import annotations

import os
import warnings

import typer
from typer.core import TyperGroup

from cli import data, demo, encode, evaluate, play, sample, store, train, vae
from minisora.errors import MinisoraError, MinisoraWarning, debug_enabled, is_remote_error, user_message

# Third-party warnings that say nothing about a minisora run, hidden unless --debug (or MINISORA_DEBUG=1):
# (message prefix, category, module). ColossalAI's imports ask for optional CUDA extensions that minisora does
# not use: TensorNVMe (async checkpoint saving) and apex (fused RMSNorm kernels).
QUIET_WARNINGS = (
    ("Please install the latest tensornvme", UserWarning, r"colossalai\.utils\.safetensors"),
    ("Please install apex from source", UserWarning, r"colossalai\.shardformer\.layer\.normalization"),
)


def where(args: list[str], e: BaseException) -> str | None:
    """The path an error without a file of its own is about: the first URL of the command line for an S3 error,
    else its --out (a full disk while writing it)."""
    from minisora.paths import url_protocol

    if is_remote_error(e) or not isinstance(e, MinisoraError):
        urls = [a for a in args if url_protocol(a) not in (None, "file")]
        if urls and (is_remote_error(e) or not isinstance(e, OSError) or e.errno != 28):
            return urls[0]
    outs = [b for a, b in zip(args, args[1:]) if a == "--out"] + [a[6:] for a in args if a.startswith("--out=")]
    return outs[0] if outs else None


def quiet_third_party_warnings() -> None:
    """Hide QUIET_WARNINGS, each by its message, category and the module that warns."""
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class _ReportingGroup(TyperGroup):
    """The one place that turns errors into the user's one line: `error: <path>: <problem>`, exit 1.

    Every minisora error type (a MinisoraError), OS errors (unwritable or missing paths, a full
    disk) and S3 client errors (credentials, connection) are reported this way; anything else is a
    bug and keeps its traceback. `--debug` or MINISORA_DEBUG=1 shows the traceback of the reported
    errors too, and the third-party warnings that QUIET_WARNINGS hides otherwise.
    """

    def invoke(self, ctx):
        with warnings.catch_warnings():  # the filters and `showwarning` set below last for this command only
            show = warnings.showwarning

            def one_line(message, category, *args, **kwargs):  # minisora's as `warning: ...`, others as usual
                if issubclass(category, MinisoraWarning):
                    typer.secho(f"warning: {message}", fg="yellow", err=True)
                else:
                    show(message, category, *args, **kwargs)

            warnings.showwarning = one_line
            args = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
            try:
                if ctx.invoked_subcommand is not None:  # a command runs (not --help): the process-wide CPU setting
                    from minisora.hardware import flush_denormals

                    flush_denormals()
                return super().invoke(ctx)
            except Exception as e:
                if not isinstance(e, (MinisoraError, OSError)) and not is_remote_error(e) or debug_enabled():
                    raise
                typer.secho(f"error: {user_message(e, where(args, e))}", fg="red", err=True)
                raise typer.Exit(1) from None


app = typer.Typer(
    cls=_ReportingGroup,
    name="minisora",
    help="Train Sora-style video DiTs on cached VAE latents: data -> encode -> train -> sample.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error and "
                                        "third-party warnings (same as MINISORA_DEBUG=1).")):
    if debug:
        os.environ["MINISORA_DEBUG"] = "1"  # also seen by torchrun workers and subprocesses
    if not debug_enabled():
        quiet_third_party_warnings()


app.add_typer(data.app, name="data", help="Clip sources: synthetic TECO-layout data, manifests, TECO downloads.")
app.add_typer(vae.app, name="vae", help="VAEs: train a small offline AutoencoderKL, inspect any diffusers VAE.")
app.command(name="encode")(encode.encode)
app.add_typer(store.app, name="store", help="Latent stores: info and verify.")
app.command(name="train")(train.train)
app.command(name="sample")(sample.sample)
app.command(name="eval")(evaluate.evaluate)
app.command(name="demo")(demo.demo)
app.command(name="play")(play.play)


if __name__ == "__main__":
    app()
