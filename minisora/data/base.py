"""What every clip reader shares: the clip error, the probe record and the checks on windows and actions.

    frames   uint8 (T, H, W, 3), RGB pixels as stored (no scaling)
    actions  int64 (T,), one per frame, or None when the clip has none

Every problem with an input file is a `ClipError` whose message names the file and the problem,
with the numbers ("/data/train/0/7.npz: has 12 frames < 20 required").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from minisora.errors import MinisoraError

KINDS = ("dmlab", "minecraft")
ACTION_DTYPE = np.dtype(np.int16)  # how the latent store keeps action ids (-1: none); the readers' bound


class ClipError(MinisoraError, ValueError):
    """Bad input clip. str(e) == f"{path}: {problem}"."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # survive the trip back from a worker process
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class ClipInfo:
    frames: int
    height: int
    width: int
    has_actions: bool


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown clip kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


@functools.lru_cache(maxsize=None)
def action_range(kind: str) -> tuple[int, int, str]:
    """(lo, hi, why): the valid action ids [lo, hi] of a kind and where that range comes from.

    The dataset card's action count when it names one (data_manifests/<kind>.json, actions.count),
    otherwise every id the store can hold: [0, int16 max].
    """
    from minisora.data import load_dataset_card

    try:
        count = load_dataset_card(check_kind(kind)).get("actions", {}).get("count")
    except (OSError, ValueError, AttributeError):  # no card: the store's bound still holds
        count = None
    if isinstance(count, int) and count > 0:
        return 0, count - 1, f"the {kind} dataset card's {count} actions"
    return 0, int(np.iinfo(ACTION_DTYPE).max), f"the ids a latent store holds ({ACTION_DTYPE})"


def check_action_values(path, actions: np.ndarray, kind: str) -> None:
    """Every action id inside action_range(kind), or a ClipError naming the clip, the value and the range."""
    lo, hi, why = action_range(kind)
    bad = (actions < lo) | (actions > hi)  # compared in the file's own dtype: nothing wraps first
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ClipError(path, f"action id {actions[i]} at frame {i} is outside [{lo}, {hi}] ({why}); "
                        f"{int(bad.sum())} of {len(actions)} actions are out of range")


def clip_suffix(kind: str) -> str:
    """File suffix of a clip of this kind: ".npz" (dmlab) or ".mp4" (minecraft)."""
    return {"dmlab": ".npz", "minecraft": ".mp4"}[check_kind(kind)]


def check_window(path, frames: int, start: int, length: int | None) -> int:
    """Validate the window [start, start + length) against a clip of `frames` frames; return its stop.

    `length=None` means "to the end of the clip". Bad arguments are the caller's bug (ValueError);
    a clip too short for the window is bad input (ClipError naming both numbers).
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if length is not None and length < 1:
        raise ValueError(f"length must be >= 1 or None, got {length}")
    required = start + (length if length is not None else 1)
    if frames < required:
        raise ClipError(path, f"has {frames} frames < {required} required")
    return start + length if length is not None else frames
