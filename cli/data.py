"""`minisora data ...`: make synthetic TECO-layout clips, download TECO's archives, scan clip roots into manifests."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


class Kind(str, Enum):
    dmlab = "dmlab"
    minecraft = "minecraft"


class SynthKind(str, Enum):
    dmlab = "dmlab"
    minecraft = "minecraft"
    doom = "doom"


class Motion(str, Enum):
    walk = "walk"
    calm = "calm"
    look = "look"
    revisit = "revisit"


MOTIONS = {"dmlab": ("walk", "calm", "revisit"), "minecraft": ("walk",), "doom": ("walk", "look")}


class OnError(str, Enum):
    fail = "fail"
    skip = "skip"


@app.command()
def synth(
    kind: SynthKind = typer.Option(SynthKind.dmlab, help="dmlab: 64x64 first-person maze (.npz); "
                                   "minecraft: 128x128 blocky world (.mp4 + actions .npz); doom: Freedoom levels "
                                   "rendered by the ViZDoom engine, in DMLab's .npz layout (read them with "
                                   "`data manifest --kind dmlab`; needs pip install 'minisora[doom]')."),
    out: Path = typer.Option(..., help="Root directory to write, in TECO layout: "
                             "OUT/{train,test}/<subdir>/<name>.{npz,mp4}."),
    clips: int = typer.Option(64, min=1, help="Number of training clips."),
    test_clips: int = typer.Option(None, min=0, help="Number of test clips (default: max(1, clips // 8))."),
    frames: int = typer.Option(300, min=2, help="Frames per clip (TECO uses 300)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same clips byte for byte."),
    workers: int = typer.Option(1, min=1, help="Worker processes."),
    motion: Motion = typer.Option(Motion.walk, help="walk: the default smooth random walk (every kind); dmlab's "
                                  "calm: sticky actions, pauses, slow turns and stretches of standing still, in "
                                  "another palette and light; dmlab's revisit: a memory test (full circles on the "
                                  "spot, walks out and back the same way, loops walked twice: views come back 36 to "
                                  "100+ frames after they were seen); doom's look: stands on the spot, turning and "
                                  "pausing."),
    size: int = typer.Option(None, help="Frame size in pixels, doom only: 64 (DMLab's, the default) or 128 "
                             "(Minecraft's)."),
):
    """Write procedurally generated, learnable clips (with actions) in TECO's published layout."""
    from minisora import paths
    from minisora.data.synthetic import camera_motion, write_synthetic_dataset

    paths.check_output_dir(out)
    n_test = max(1, clips // 8) if test_clips is None else test_clips
    if motion.value not in MOTIONS[kind.value]:
        having = [k for k, m in MOTIONS.items() if motion.value in m]
        msg = f"error: --motion {motion.value} exists for --kind {' and '.join(having)} only, not {kind.value}"
        typer.secho(msg, fg="red", err=True)
        raise typer.Exit(1)
    if size is not None and (kind != SynthKind.doom or size not in (64, 128)):
        msg = (f"error: --size {size}: doom clips are 64 or 128 pixels" if kind == SynthKind.doom else
               f"error: --size exists for --kind doom only; {kind.value} clips have one size")
        typer.secho(msg, fg="red", err=True)
        raise typer.Exit(1)
    stats = write_synthetic_dataset(kind.value, out, clips=clips, test_clips=n_test, frames=frames, seed=seed,
                                    workers=workers, motion=motion.value, size=size)
    reused = f"; reused {stats['reused']} clips already there" if stats["reused"] else ""
    typer.echo(
        f"wrote {stats['written']} {kind.value} clips ({stats['written'] * frames} frames) to {out}{reused} "
        f"in {stats['seconds']:.1f}s: {stats['written'] / max(stats['seconds'], 1e-9):.1f} clips/s"
    )
    moves = camera_motion(kind.value, motion.value)
    if moves:
        typer.echo(f"actions move the camera by {moves} (forward:turn-degrees per action id): to retrieve memory by "
                   f"pose, train with --retrieve-frames N --use-actions --retrieve-motion {moves} "
                   "--retrieve-radius 2 (docs/design-notes.md, memory part 5)")


@app.command()
def manifest(
    root: Path = typer.Argument(..., exists=True, file_okay=False,
                                help="A TECO-layout root: ROOT/{train,test}/<subdir>/<name>.{npz,mp4}."),
    kind: Kind = typer.Option(..., help="Dataset kind: dmlab (.npz with video+actions) "
                              "or minecraft (.mp4 + sibling actions .npz)."),
    out: Path = typer.Option(..., help="Manifest file to write (JSON)."),
    checksum: bool = typer.Option(False, "--checksum", help="Also record each file's sha256 (reads every byte)."),
    on_error: OnError = typer.Option(OnError.fail, help="fail: stop at the first bad clip, naming it; "
                                     "skip: leave bad clips out, list them and go on."),
    min_frames: int = typer.Option(1, min=1, help="Clips with fewer frames are bad input."),
    workers: int = typer.Option(1, min=1, help="Worker processes for probing clips."),
):
    """Scan a clip root and write a per-clip manifest (the input of `minisora encode`)."""
    from minisora import paths
    from minisora.data.manifest import build_manifest

    if out.is_dir():  # before every clip is probed
        raise paths.OutputPathError(f"{out}: is a directory; the manifest is a file")
    paths.check_output_file(out)
    m, skipped = build_manifest(root, kind.value, checksum=checksum, on_error=on_error.value, min_frames=min_frames,
                                workers=workers)
    m.save(out)
    for path, reason in skipped:
        typer.secho(f"skipped {path}: {reason}", fg="yellow", err=True)
    per_split = ", ".join(f"{s}: {n}" for s, n in m.split_counts().items())
    typer.echo(f"wrote {out}: {len(m.clips)} clips ({per_split}), {len(skipped)} skipped")


@app.command()
def download(
    kind: Kind = typer.Argument(..., metavar="KIND", help="Which TECO dataset: dmlab (~54 GB, 3 parts) "
                                "or minecraft (~210 GB, 11 parts)."),
    directory: Path = typer.Argument(..., metavar="DIR", help="Where to download (DIR/parts/) and unpack; "
                                     "needs about twice the dataset size."),
    base_url: str = typer.Option(None, help="Mirror serving <item>/<file> like https://archive.org/download "
                                 "(default: the dataset card's URLs)."),
    manifest: Path = typer.Option(None, help="Manifest file to write (default: DIR/manifest.json)."),
    keep_parts: bool = typer.Option(True, "--keep-parts/--delete-parts",
                                    help="Keep the archive parts after a successful unpack, or delete them."),
    on_error: OnError = typer.Option(OnError.fail, help="Manifest step: fail at the first bad clip, "
                                     "or skip bad clips and list them."),
    workers: int = typer.Option(1, min=1, help="Worker processes for probing clips in the manifest step."),
    retries: int = typer.Option(5, min=0, help="Retries per part after a dropped connection or a 5xx answer "
                                "(each resumes where it stopped)."),
    timeout: float = typer.Option(60.0, min=1.0, help="Seconds without data before a connection counts as dropped."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars (bytes) on stderr."),
):
    """Download TECO's archive from the Internet Archive, verify it, unpack it and write its manifest.

    Resumes interrupted downloads; checks sizes and md5/sha1 against the archive's <item>_files.xml.
    """
    from minisora import paths
    from minisora.data.download import download_dataset

    paths.check_output_dir(directory, "DIR")
    if manifest is not None:
        paths.check_output_file(manifest, "--manifest")
    report = download_dataset(kind.value, directory, base_url=base_url, manifest=manifest, keep_parts=keep_parts,
                              on_error=on_error.value, workers=workers, timeout=timeout, retries=retries,
                              progress=progress)
    for path, reason in report.skipped:
        typer.secho(f"skipped {path}: {reason}", fg="yellow", err=True)
    fetched = sum(p.fetched for p in report.parts)
    typer.echo(f"{kind.value}: {len(report.parts)} parts ({fetched} bytes fetched now), "
               f"{report.members} tar members unpacked; "
               f"clips under {report.root}")
    typer.echo(f"wrote {report.manifest}: {report.clips} clips, {len(report.skipped)} skipped")
