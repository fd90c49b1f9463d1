"""Procedural stand-ins for TECO's DMLab and Minecraft clips: learnable video with actions, offline.

One renderer per file: `maze.py` (`dmlab`: a first-person walk through a random grid maze, drawn
by a numpy raycaster at 64x64) and `world.py` (`minecraft`: a walk over a blocky heightmap world,
drawn by a voxel-space renderer at 128x128); `doom.py` (`doom`: not drawn here but by a real game
engine, ViZDoom, at 64x64 or 128x128, written in DMLab's npz layout). This module writes datasets of
each kind.
`dmlab` has three motion families: `walk` (the default, above), `calm` (`calm.py`: sticky actions,
pauses, slow turns and stretches of standing still, in a dusk palette with planked walls) and `revisit`
(`revisit.py`: full circles on the spot, walks out and back the same way, loops walked twice: a memory test).

Both walks are a random but smooth policy over discrete actions: an action is held for several
frames, and a step that would walk into a wall (or up a cliff) is replaced by a turn, so the view
changes gradually and the camera never enters solid cells. Action convention: `actions[t]` is the
action whose effect is frame t, i.e. the move from frame t-1 to frame t (one step is simulated
before the first frame, so `actions[0]` is real too).

On disk (TECO's layout, read by `minisora.data.clips`):
    dmlab:      OUT/{train,test}/0000/00000.npz   video uint8 (T, 64, 64, 3), actions int64 (T,)
    doom:       OUT/{train,test}/0000/00000.npz   video uint8 (T, S, S, 3), S = 64 or 128, as dmlab
    minecraft:  OUT/{train,test}/0000/00000.mp4   T frames 128x128 at 20 fps (H.264)
                OUT/{train,test}/0000/00000.npz   actions int64 (T,)
1000 clips per subdirectory. Clip i of a split is rendered from a seed derived from
(seed, split, i), so the output does not depend on `workers`; npz files are written with a fixed
zip timestamp, so the same arguments give the same bytes. Every file appears atomically (written
under OUT/.partial, then os.replace), and a re-run over the same directory keeps complete clips.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minisora.data.synthetic.calm import CALM_LOOK, CALM_SPEED, CALM_TURN, calm_walk, render_calm_clip
from minisora.data.synthetic.common import DMLAB_ACTIONS, MINECRAFT_ACTIONS
from minisora.data.synthetic.doom import DOOM_MOTIONS, DOOM_SIZES, import_vizdoom, render_doom_clip
from minisora.data.synthetic.maze import (MAZE_RADIUS, MAZE_SPEED, MAZE_TURN, WALK_LOOK, Maze, MazeLook, MazePose,
                                          dmlab_walk, make_maze, maze_clearance, move_in_maze, render_dmlab_clip,
                                          render_maze)
from minisora.data.synthetic.revisit import REVISIT_CIRCLE, REVISIT_TURN, render_revisit_clip, revisit_walk
from minisora.data.synthetic.world import (WORLD_EYE, Player, World, make_world, minecraft_walk, move_in_world,
                                           render_minecraft_clip, render_world, world_clearance)
from minisora.errors import MinisoraError

__all__ = ["DMLAB_ACTIONS", "MINECRAFT_ACTIONS", "KINDS", "SPLITS", "MAZE_RADIUS", "MAZE_SPEED", "MAZE_TURN",
           "Maze", "MazePose", "dmlab_walk", "make_maze", "maze_clearance", "move_in_maze", "render_dmlab_clip",
           "render_maze", "WORLD_EYE", "Player", "World", "make_world", "minecraft_walk", "move_in_world",
           "render_minecraft_clip", "render_world", "world_clearance", "clip_stem", "clip_seed", "save_npz",
           "write_synthetic_dataset", "MOTIONS", "CALM_LOOK", "WALK_LOOK", "MazeLook", "calm_walk", "render_calm_clip",
           "REVISIT_CIRCLE", "REVISIT_TURN", "render_revisit_clip", "revisit_walk", "camera_motion"]

KINDS = ("dmlab", "minecraft", "doom")
MOTIONS = ("walk", "calm", "revisit")  # dmlab's motion families; minecraft has walk only
KIND_MOTIONS = {"dmlab": MOTIONS, "minecraft": ("walk",), "doom": DOOM_MOTIONS}
KIND_SIZES = {"dmlab": (64,), "minecraft": (128,), "doom": tuple(DOOM_SIZES)}
SPLITS = ("train", "test")
CLIPS_PER_SUBDIR = 1000
GENERATOR_VERSION = 1  # bump when a change alters the rendered pixels
PARAMS_FILE = "synthetic.json"


def camera_motion(kind: str, motion: str) -> str | None:
    """How a synthetic family's actions move the camera, as `minisora train --retrieve-motion` takes it: per
    DMLAB_ACTIONS id its forward step and turn in degrees (left positive); None where the actions move it by no
    fixed amounts (minecraft's jumps and falls, doom's engine). A forward step into a wall may slide or stay put, so
    the sum of the moves is exact by construction only on `revisit`, whose walks never slide."""
    rates = {"walk": (MAZE_SPEED, MAZE_TURN), "calm": (CALM_SPEED, CALM_TURN), "revisit": (MAZE_SPEED, REVISIT_TURN)}
    if kind != "dmlab" or motion not in rates:
        return None
    speed, turn = rates[motion]
    return f"{speed:g}:0,0:{np.degrees(turn):g},0:{-np.degrees(turn):g},0:0"


# --- writing a dataset --------------------------------------------------------------------------


def clip_stem(root: str | Path, split: str, index: int) -> Path:
    """OUT/<split>/<subdir>/<name> without extension: 1000 clips per subdir, names like 00042."""
    return Path(root) / split / f"{index // CLIPS_PER_SUBDIR:04d}" / f"{index:05d}"


def clip_seed(seed: int, split: str, index: int) -> int:
    """The seed of clip `index` of `split`, independent of how the work is divided."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1)[0])


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez's format (uncompressed zip of .npy) with a fixed timestamp: same arrays, same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


@dataclass(frozen=True)
class _ClipJob:
    kind: str
    root: Path
    split: str
    index: int
    frames: int
    seed: int
    motion: str = "walk"
    size: int = 64


def _write_clip(job: _ClipJob) -> bool:
    """Render and write one clip unless it is already complete; True if it was written."""
    stem = clip_stem(job.root, job.split, job.index)
    final = stem.with_suffix(".mp4" if job.kind == "minecraft" else ".npz")
    if final.exists():
        return False
    stem.parent.mkdir(parents=True, exist_ok=True)
    partial = job.root / ".partial"
    partial.mkdir(exist_ok=True)
    tmp = partial / f"{job.split}-{job.index:05d}-{os.getpid()}"
    seed = clip_seed(job.seed, job.split, job.index)
    if job.kind in ("dmlab", "doom"):
        if job.kind == "doom":
            video, actions = render_doom_clip(seed, job.frames, job.size, job.motion)
        else:
            render = {"calm": render_calm_clip, "revisit": render_revisit_clip}.get(job.motion, render_dmlab_clip)
            video, actions = render(seed, job.frames)
        save_npz(tmp.with_suffix(".npz"), video=video, actions=actions)
        os.replace(tmp.with_suffix(".npz"), final)
    else:
        from minisora.video import write_mp4

        video, actions = render_minecraft_clip(seed, job.frames)
        save_npz(tmp.with_suffix(".npz"), actions=actions)
        os.replace(tmp.with_suffix(".npz"), stem.with_suffix(".npz"))
        write_mp4(tmp.with_suffix(".mp4"), video, fps=20)  # the mp4 last: it marks the clip complete
        os.replace(tmp.with_suffix(".mp4"), final)
    return True


class SynthError(MinisoraError, ValueError):
    """An --out that the synthetic writer cannot add clips to; the message names the file."""


def _check_params(root: Path, params: dict) -> None:
    """Record the generator's arguments; refuse to add clips made with different ones."""
    path = root / PARAMS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SynthError(f"{path}: unreadable record of the settings ({e}); choose a new --out") from e
        diff = {k: (old.get(k), params.get(k)) for k in {**old, **params} if old.get(k) != params.get(k)}
        if diff:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise SynthError(f"{path}: this directory holds synthetic clips made with other settings ({detail}); "
                             "choose a new --out or repeat those settings")
        return
    tmp = root / f".{PARAMS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, path)


def _check_no_other_clips(root: Path, counts: dict[str, int]) -> None:
    """Refuse to write fewer clips than `root` holds: the next manifest would find the others too.

    Refused rather than removed: the other clips may be the ones the user meant to keep (a smaller --clips
    by mistake), and a root is only ours when its synthetic.json says so."""
    other = {}
    for split, n in counts.items():
        stems = {p.with_suffix("") for p in root.glob(f"{split}/[0-9][0-9][0-9][0-9]/[0-9][0-9][0-9][0-9][0-9].*")
                 if p.suffix in (".npz", ".mp4")}
        other[split] = sum(int(s.name) >= n for s in stems)
    if sum(other.values()):
        held = ", ".join(f"{n} {split}" for split, n in other.items() if n)
        raise SynthError(f"{root}: holds {sum(other.values())} other clips ({held}) beyond the {counts['train']} train "
                         f"+ {counts['test']} test asked for, and the next manifest would find them; choose a new "
                         "empty --out, or ask for at least as many clips as are there")


def write_synthetic_dataset(
    kind: str, out: str | Path, *, clips: int, test_clips: int = 0, frames: int = 300, seed: int = 0, workers: int = 1,
    progress: bool = True, motion: str = "walk", size: int | None = None,
) -> dict:
    """Write `clips` train and `test_clips` test clips of `kind` under `out` in TECO's layout.

    `motion` picks dmlab's family (MOTIONS) or doom's policy (DOOM_MOTIONS); a non-default one is recorded
    in synthetic.json (the default writes the same bytes as before the option existed). `size` is the
    frame size, which only doom lets choose (64 or 128; None: the kind's first).

    Complete clips already there (from an interrupted or smaller run with the same kind, frames
    and seed) are kept. Returns {"kind", "clips" (train + test), "train", "test", "frames" (all
    clips), "written", "reused", "seconds"}.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    if motion not in KIND_MOTIONS[kind]:
        raise ValueError(f"unknown motion {motion!r} for synthetic kind {kind!r}; it has {KIND_MOTIONS[kind]}")
    size = KIND_SIZES[kind][0] if size is None else size
    if size not in KIND_SIZES[kind]:
        raise ValueError(f"size {size} for synthetic kind {kind!r}: it has {KIND_SIZES[kind]}")
    if clips < 0 or test_clips < 0 or frames < 2 or workers < 1:
        raise ValueError(f"need clips >= 0, test_clips >= 0, frames >= 2, workers >= 1; "
                         f"got {clips}, {test_clips}, {frames}, {workers}")
    engine = import_vizdoom().__version__ if kind == "doom" else None  # without it: how to install, nothing written
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise SynthError(f"{root}: is an existing file; --out must be a new or existing directory")
    root.mkdir(parents=True, exist_ok=True)
    params = {"generator": "minisora.data.synthetic", "version": GENERATOR_VERSION, "kind": kind, "frames": frames,
              "seed": seed}
    if kind == "doom":  # the engine and its version decide the pixels
        params |= {"size": size, "motion": motion, "vizdoom": engine}
    _check_params(root, params if motion == "walk" or kind == "doom" else {**params, "motion": motion})
    _check_no_other_clips(root, {"train": clips, "test": test_clips})
    jobs = [_ClipJob(kind, root, split, i, frames, seed, motion, size)
            for split, n in (("train", clips), ("test", test_clips)) for i in range(n)]
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"synth {kind}", unit="clip", disable=not progress)
    written = 0
    if workers == 1:
        for job in jobs:
            written += _write_clip(job)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for done in pool.map(_write_clip, jobs):
                written += done
                bar.update()
    bar.close()
    partial = root / ".partial"
    if partial.exists():
        for leftover in partial.iterdir():  # from an interrupted run; every clip is complete now
            leftover.unlink()
        partial.rmdir()
    seconds = time.perf_counter() - start
    n = len(jobs)
    return {"kind": kind, "clips": n, "train": clips, "test": test_clips, "frames": n * frames, "written": written,
            "reused": n - written, "seconds": seconds}
