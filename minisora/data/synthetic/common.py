"""What the synthetic renderers share: action names and the supersampled-frame downsampler."""

from __future__ import annotations

import numpy as np

DMLAB_ACTIONS = ("forward", "turn_left", "turn_right", "noop")
MINECRAFT_ACTIONS = ("forward", "turn_left", "turn_right", "noop", "jump", "look_up", "look_down")


def downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Float (t, n*f, n*f, 3) in [0, 1] -> uint8 (t, n, n, 3), averaging f x f blocks."""
    if factor > 1:
        t, n = rgb.shape[0], rgb.shape[1] // factor
        rgb = rgb.reshape(t, n, factor, n, factor, 3).mean((2, 4))  # (t, n, f, n, f, 3) -> (t, n, n, 3)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def turn_to_open_side(clearance, angle: float, rng: np.random.Generator, left: int, right: int, tie: float) -> int:
    """The turn action towards the side with the longest clear view within 90 degrees (random when the
    two sides differ by less than `tie`). clearance(angle) -> distance to the first obstacle."""
    space = {a: max(clearance(angle + sign * np.radians(deg)) for deg in (30, 60, 90))
             for a, sign in ((left, 1), (right, -1))}
    if abs(space[left] - space[right]) < tie:
        return int(rng.choice([left, right]))
    return max(space, key=space.get)
