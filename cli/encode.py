"""`minisora encode`: stage one, clips -> VAE -> Zarr latent store."""

from __future__ import annotations

from pathlib import Path

import typer

from minisora.configs import EncodeConfig, defaults

E = defaults(EncodeConfig)  # every option's default is its EncodeConfig field's


def encode(
    manifest: Path = typer.Argument(..., exists=True, dir_okay=False, help="Clip manifest written by `minisora data "
                                    "manifest`."),
    vae: str = typer.Option(..., help="VAE: a local diffusers model directory or a Hub id (e.g. "
                            "stabilityai/sd-vae-ft-ema)."),
    out: str = typer.Option(..., help="Latent store to write: a local path or an fsspec URL (s3://..., memory://..., "
                            "file://...)."),
    vae_subfolder: str = typer.Option(E.vae_subfolder, help="Subfolder of the VAE inside the model directory/repo "
                                      "(e.g. 'vae' for a pipeline)."),
    vae_revision: str = typer.Option(E.vae_revision, help="Hub revision (branch, tag or commit) of the VAE."),
    root: Path = typer.Option(E.root, help="Clip root, if the data moved since the manifest was written (default: the "
                              "manifest's root)."),
    splits: str = typer.Option(",".join(E.splits), help="Comma-separated splits to encode."),
    batch_size: int = typer.Option(E.batch_size, min=1, help="Frames per VAE call (image VAEs); lower it if the GPU "
                                   "runs out of memory."),
    device: str = typer.Option(E.device, help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option(E.dtype, help="VAE compute dtype: fp32, bf16 or fp16 (latents are stored as fp16 either "
                              "way)."),
    frame_stride: int = typer.Option(E.frame_stride, min=1, help="Keep every k-th frame (fps is divided by k)."),
    size: int = typer.Option(E.size, min=8, help="Resize frames to SIZE x SIZE before the VAE (default: native "
                             "resolution)."),
    on_error: str = typer.Option(E.on_error, help="fail: stop at the first bad clip, naming it (committed shards are "
                                 "kept); skip: leave bad clips out and record them in the store."),
    overwrite: bool = typer.Option(E.overwrite, "--overwrite", help="Delete the latent store at OUT (only its own "
                                   "files, and only if OUT is a store) and start over."),
    clips_per_shard: int = typer.Option(E.clips_per_shard, min=1, help="Clips per shard (the unit of work and of "
                                        "resumption) (default: ~32 MB of latents per shard)."),
    read_workers: int = typer.Option(E.read_workers, min=1, help="Threads that read and decode clips ahead of the "
                                     "VAE."),
    compression_level: int = typer.Option(E.compression_level, min=0, max=22, help="zstd level of the stored arrays; 0 "
                                          "stores them uncompressed."),
):
    """Encode every frame of every manifest clip once with the VAE into a chunked Zarr latent store.

    Run it as one process, or on N GPUs / nodes with `torchrun --nproc_per_node=N --no-python minisora encode ...`
    (each rank takes whole shards). Re-running the same command resumes an interrupted job.
    """
    options = dict(locals())  # the options by name, each an EncodeConfig field
    from minisora.errors import MinisoraError
    from minisora import paths
    from stages.encode import EncodeError, main

    paths.check_vae(vae)
    paths.check_store_output(out)
    if on_error not in ("fail", "skip"):
        raise typer.BadParameter("must be fail or skip", param_hint="--on-error")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise typer.BadParameter("must be fp32, bf16 or fp16", param_hint="--dtype")
    cfg = EncodeConfig(**options | {"manifest": str(manifest), "root": str(root) if root else None,
                                    "splits": tuple(s for s in splits.split(",") if s)})
    try:
        summary = main(cfg)  # errors: cli/main.py reports them
    except MinisoraError:
        raise
    except ValueError as e:  # a bad option value (e.g. --device cuda without a GPU) met in a library call
        raise EncodeError(str(e)) from e
    if "latent_stats" in summary:
        typer.echo(f"store {out} complete: {summary['rank_clips']} clips / {summary['rank_frames']} frames encoded by "
                   f"this process in {summary['seconds']:.1f}s; {len(summary['skipped'])} clips skipped")
        for s in summary["manifest_skipped"]:
            typer.secho(f"skipped {s['path']} (left out by `data manifest`): {s['reason']}", fg="yellow", err=True)
        for s in summary["skipped"]:
            typer.secho(f"skipped {s['path']}: {s['reason']}", fg="yellow", err=True)  # paths include the split
