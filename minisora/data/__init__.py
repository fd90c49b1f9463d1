"""Clip sources: TECO DMLab (.npz) and Minecraft (.mp4 + actions .npz) readers, manifests, dataset cards.

    probe_clip(path, kind) -> ClipInfo           read_clip(path, kind, start, length) -> (frames, actions)
    build_manifest(root, kind) -> (Manifest, skipped)   load_dataset_card(kind) -> dict

The dataset cards (data_manifests/<kind>.json) hold the published facts about the real datasets
(source, download items, resolution, frames per clip, split sizes) so tools read them from one place.
"""

from __future__ import annotations

import json
from pathlib import Path

from minisora.data.clips import KINDS, ClipError, ClipInfo, clip_suffix, probe_clip, read_clip

CARDS_DIR = Path(__file__).parents[2] / "data_manifests"

__all__ = ["KINDS", "ClipError", "ClipInfo", "clip_suffix", "probe_clip", "read_clip", "load_dataset_card", "CARDS_DIR"]


def load_dataset_card(kind: str) -> dict:
    """The dataset card of a real dataset: data_manifests/<kind>.json, as a dict."""
    if kind not in KINDS:
        raise ValueError(f"no dataset card for {kind!r}; cards exist for {', '.join(KINDS)}")
    path = CARDS_DIR / f"{kind}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: dataset card missing "
                                f"(is this an installed copy without data_manifests/?)") from None
