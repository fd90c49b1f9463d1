"""Minecraft clips in TECO's published layout: ROOT/{train,test}/<subdir>/<name>.mp4 (300 frames,
128x128) with a sibling <name>.npz holding `actions` (300,), one action per frame.

Video is decoded with PyAV through `minisora.video.read_mp4`, which seeks to the keyframe before
the window, so a window read does not decode the whole file. A probe reads the container header
and the actions' .npy header only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minisora.data.base import ClipError, ClipInfo, check_action_values, check_window
from minisora.data.npz import check_actions, npz_header, npz_rows, open_npz
from minisora.video import VideoError, probe_mp4, read_mp4


def actions_path(path) -> Path:
    """The sibling .npz that holds a video's actions: <name>.mp4 -> <name>.npz."""
    return Path(path).with_suffix(".npz")


def _video_error(path: Path, e: VideoError) -> ClipError:
    problem = str(e).removeprefix(f"{path}: ")
    return ClipError(path, f"undecodable mp4: {problem}")


def probe_minecraft_clip(path) -> ClipInfo:
    """ClipInfo from the mp4 container header and the actions' .npy header (nothing is decoded)."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(path, "file not found")
    try:
        frames, height, width, _ = probe_mp4(path)
    except VideoError as e:
        raise _video_error(path, e) from e
    npz = actions_path(path)
    if not npz.is_file():
        raise ClipError(path, f"actions file {npz} not found (TECO keeps each video's actions in a sibling .npz)")
    with open_npz(npz) as zf:
        header = npz_header(zf, npz, "actions")
        if header is None:
            members = ", ".join(sorted(n.removesuffix(".npy") for n in zf.namelist())) or "none"
            raise ClipError(npz, f"no `actions` array (members: {members})")
        check_actions(npz, header, frames, video=path.name)
        check_action_values(npz, npz_rows(zf, npz, "actions", 0, frames), "minecraft")
    return ClipInfo(frames=frames, height=height, width=width, has_actions=True)


def read_minecraft_clip(path, start: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames [start, start + length) as uint8 (T, 128, 128, 3) and their actions as int64 (T,)."""
    path = Path(path)
    info = probe_minecraft_clip(path)
    stop = check_window(path, info.frames, start, length)
    try:
        frames = read_mp4(path, start, stop - start)
    except VideoError as e:
        raise _video_error(path, e) from e
    if len(frames) != stop - start:
        raise ClipError(
            path, f"decoded {len(frames)} frames from frame {start}, expected {stop - start} "
                  f"(the container says {info.frames})"
        )
    if frames.shape[1:3] != (info.height, info.width):
        raise ClipError(path, f"decoded frames are {frames.shape[1:3]}, the container says {(info.height, info.width)}")
    npz = actions_path(path)
    with open_npz(npz) as zf:
        actions = npz_rows(zf, npz, "actions", start, stop)
    check_action_values(npz, actions, "minecraft")
    return frames, actions.astype(np.int64)  # in range: exact
