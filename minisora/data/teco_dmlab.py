"""DeepMind Lab clips in TECO's published layout: ROOT/{train,test}/<subdir>/<name>.npz.

Each archive holds `video` uint8 (300, 64, 64, 3) and `actions` integer (300,), one action per
frame. Archives are read without pickle, through the helpers in `npz.py`: a probe reads only the
.npy headers, a window read only up to the window's last frame.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from minisora.data.base import ClipError, ClipInfo, check_action_values, check_window
from minisora.data.npz import check_actions, npz_header, npz_rows, open_npz


def _dmlab_headers(zf: zipfile.ZipFile, path: Path) -> ClipInfo:
    video = npz_header(zf, path, "video")
    if video is None:
        members = ", ".join(sorted(n.removesuffix(".npy") for n in zf.namelist())) or "none"
        raise ClipError(path, f"no `video` array (members: {members})")
    shape, dtype = video
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise ClipError(path, f"`video` must be uint8 (T, H, W, 3), got {dtype} {shape}")
    actions = npz_header(zf, path, "actions")
    if actions is not None:
        check_actions(path, actions, shape[0])
    return ClipInfo(frames=shape[0], height=shape[1], width=shape[2], has_actions=actions is not None)


def probe_dmlab_clip(path) -> ClipInfo:
    """ClipInfo of a DMLab npz from its .npy headers (no frame data is read; the actions are, and checked)."""
    path = Path(path)
    with open_npz(path) as zf:
        info = _dmlab_headers(zf, path)
        if info.has_actions:
            check_action_values(path, npz_rows(zf, path, "actions", 0, info.frames), "dmlab")
        return info


def read_dmlab_clip(path, start: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Frames [start, start + length) as uint8 (T, 64, 64, 3) and actions int64 (T,) (None if absent)."""
    path = Path(path)
    with open_npz(path) as zf:
        info = _dmlab_headers(zf, path)
        stop = check_window(path, info.frames, start, length)
        frames = npz_rows(zf, path, "video", start, stop)
        actions = None
        if info.has_actions:
            actions = npz_rows(zf, path, "actions", start, stop)
            check_action_values(path, actions, "dmlab")
            actions = actions.astype(np.int64)  # in range: exact
    return frames, actions
