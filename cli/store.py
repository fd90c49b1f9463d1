"""`minisora store info|verify`: inspect and check a latent store."""

from __future__ import annotations

import json

import typer

app = typer.Typer(no_args_is_help=True)


def _open(url: str):
    from minisora import paths
    from minisora.store import LatentStore

    paths.check_store(url, "STORE")
    return LatentStore(url)  # a StoreError is reported by cli/main.py


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


@app.command()
def info(
    store: str = typer.Argument(..., help="Latent store path or fsspec URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Splits, clips, latent frames, shapes, bytes on disk (and per frame vs raw pixels), VAE, statistics, \
skipped clips."""
    s = _open(store).info()
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    vae, src = s["vae"] or {}, s["source"] or {}
    typer.echo(f"store        {s['url']} (schema v{s['schema_version']}, "
               f"{'complete' if s['complete'] else 'INCOMPLETE'})")
    typer.echo(f"source       {src.get('kind')} {src.get('resolution')} stride {src.get('frame_stride')} "
               f"fps {src.get('fps')} "
               f"manifest {str(src.get('manifest_digest'))[:12]}")
    typer.echo(f"vae          {vae.get('class_name')} {vae.get('source')} (spatial x{vae.get('spatial_compression')}, "
               f"temporal x{vae.get('temporal_compression')}, {vae.get('latent_channels')} ch, "
               f"scaling {vae.get('scaling_factor')})")
    raw = s["raw_pixel_bytes_per_latent_frame"]
    for name, sp in s["splits"].items():
        typer.echo(f"{name:<12} {sp['clips']} clips, {sp['latent_frames']} latent frames "
                   f"(max {sp['max_frames']}/clip), "
                   f"latent {tuple(sp['latent_shape'])}, {sp['committed_shards']}/{sp['shards']} shards, "
                   f"{_mb(sp['bytes'])}, "
                   f"{sp['bytes_per_frame']:.0f} B/frame vs {raw} B raw pixels "
                   f"({raw / max(sp['bytes_per_frame'], 1e-9):.1f}x smaller)")
    st = s["latent_stats"]
    if st:
        typer.echo(f"stats        mean {[round(x, 4) for x in st['mean']]} std {[round(x, 4) for x in st['std']]} "
                   f"(over {st['split']})")
    typer.echo(f"bytes        {_mb(s['bytes'])} on disk; {len(s['skipped'])} skipped clips")
    for sk in s["manifest_skipped"]:
        typer.echo(f"  skipped {sk['path']} (left out by `data manifest`): {sk['reason']}")
    for sk in s["skipped"]:
        typer.echo(f"  skipped {sk['path']}: {sk['reason']}")  # paths include the split


@app.command()
def verify(store: str = typer.Argument(..., help="Latent store path or fsspec URL.")):
    """Re-read every committed shard: checksums, lengths, padding, every manifest clip present or skipped. \
Exit 1 on any problem."""
    problems = _open(store).verify(progress=True)
    for p in problems:
        typer.secho(f"problem: {p}", fg="red", err=True)
    if problems:
        typer.secho(f"{store}: {len(problems)} problem(s)", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: ok, every shard verified")
