"""One entry point for raw clips of every kind: probe a clip cheaply, read a window of it.

A clip is one trajectory on disk in TECO's published layout. The format specifics live in one reader
per kind (`teco_dmlab.py`: .npz with `video` and `actions`; `teco_minecraft.py`: .mp4 plus a sibling
actions .npz); `READERS` maps each kind to its probe and read functions, and this module dispatches
through it. The types and checks every reader shares live in `base.py`, the npz helpers in `npz.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from minisora.data.base import (ACTION_DTYPE, KINDS, ClipError, ClipInfo, action_range, check_action_values,
                                check_kind, check_window, clip_suffix)
from minisora.data.teco_dmlab import probe_dmlab_clip, read_dmlab_clip
from minisora.data.teco_minecraft import actions_path, probe_minecraft_clip, read_minecraft_clip

__all__ = ["ACTION_DTYPE", "KINDS", "READERS", "ClipError", "ClipInfo", "action_range", "check_action_values",
           "check_window", "clip_files", "clip_suffix", "probe_clip", "read_clip"]


class Reader(NamedTuple):
    probe: Callable[..., ClipInfo]  # probe(path) -> ClipInfo
    read: Callable[..., tuple[np.ndarray, np.ndarray | None]]  # read(path, start, length) -> (frames, actions)
    files: Callable[[Path], list[Path]]  # every file one clip consists of


READERS: dict[str, Reader] = {
    "dmlab": Reader(probe_dmlab_clip, read_dmlab_clip, lambda path: [path]),
    "minecraft": Reader(probe_minecraft_clip, read_minecraft_clip, lambda path: [path, actions_path(path)]),
}
assert tuple(READERS) == KINDS


def probe_clip(path, kind: str) -> ClipInfo:
    """Frame count, size and whether actions exist, without decoding the frames."""
    return READERS[check_kind(kind)].probe(path)


def read_clip(path, kind: str, start: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Frames [start, start + length) as uint8 (T, H, W, 3) and their actions as int64 (T,) or None."""
    return READERS[check_kind(kind)].read(path, start, length)


def clip_files(path, kind: str) -> list[Path]:
    """Every file a clip consists of (minecraft: the mp4 and its actions npz)."""
    return READERS[check_kind(kind)].files(Path(path))
