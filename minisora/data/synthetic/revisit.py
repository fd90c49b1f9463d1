"""`dmlab --motion revisit`: the maze of `maze.py` walked by an agent that comes back to what it saw.

A memory test: much of what comes into view was seen 16 to 100+ frames earlier, so no copy of the
last frames can predict it, while a model that remembers the earlier frames can. A clip is a seeded
mix of four segments (REVISIT_PROBS), each drawn when the previous one ends:
- `spin`: one or two full circles on the spot, REVISIT_CIRCLE = 36 frames each, so the second circle
  repeats the first frame for frame and the end of a circle repeats its start;
- `loop`: walk out along the corridors for 12 to 40 frames, turn around (18 frames), retrace the way
  back, turn around again: back at the start pose, facing the same way, 60 to 116 frames later;
- `repeat`: the last loop again, action for action (a closed loop walked twice), when the agent still
  stands where that loop started (otherwise a new loop);
- `move`: walk on for 16 to 48 frames to a new place (new views: not everything is a revisit).
The retrace is exact because a loop walks out with straight forward steps only (never sliding along a
wall), so each step is undone by a forward step after a half turn. One turn rate (REVISIT_TURN, 10
degrees a frame) and one speed (MAZE_SPEED) for every clip, so an action means the same everywhere;
the look is the default walk's (WALK_LOOK): only the motion differs from `walk`.
Actions are DMLAB_ACTIONS, with the same convention (`actions[t]` is the move into frame t).
"""

from __future__ import annotations

import numpy as np

from minisora.data.synthetic.common import DMLAB_ACTIONS, turn_to_open_side
from minisora.data.synthetic.maze import (MAZE_SPEED, MAZE_STOP, Maze, MazePose, make_maze, maze_clearance,
                                          move_in_maze, render_maze, turned_to_open)

REVISIT_CIRCLE = 36  # frames per full turn on the spot
REVISIT_TURN = 2 * np.pi / REVISIT_CIRCLE  # per frame
REVISIT_SEGMENTS = ("spin", "loop", "repeat", "move")
REVISIT_PROBS = (0.25, 0.25, 0.35, 0.15)
REVISIT_LOOP_OUT = (12, 41)  # frames walked out in a loop, [lo, hi)
REVISIT_MOVE = (16, 49)  # frames walked on to a new place, [lo, hi)
_FORWARD, _LEFT, _RIGHT, _NOOP = range(len(DMLAB_ACTIONS))
_WALK_PROBS = (0.8, 0.1, 0.1, 0.0)  # within a segment: forward, turn_left, turn_right, noop
_HOLDS = ((6, 25), (2, 7), (2, 7), (1, 2))  # hold ranges [lo, hi) per action


class _Track:
    """The poses and actions of a clip so far; `step` applies one action (and stops at `frames`)."""

    def __init__(self, maze: Maze, pose: MazePose, frames: int) -> None:
        self.maze, self.pose, self.frames = maze, pose, frames
        self.pos, self.angles, self.actions = [], [], []

    def full(self) -> bool:
        return len(self.actions) >= self.frames

    def step(self, action: int) -> None:
        if not self.full():
            self.pose = move_in_maze(self.maze, self.pose, action, MAZE_SPEED, REVISIT_TURN)
            self.pos.append((self.pose.x, self.pose.y))
            self.angles.append(self.pose.angle)
            self.actions.append(action)

    def play(self, actions: list[int]) -> None:
        for a in actions:
            self.step(a)


def _straight(maze: Maze, pose: MazePose) -> bool:
    """True when a forward step moves straight ahead (neither blocked nor sliding along a wall)."""
    nxt = move_in_maze(maze, pose, _FORWARD, MAZE_SPEED, REVISIT_TURN)
    return nxt.x == pose.x + MAZE_SPEED * np.cos(pose.angle) and nxt.y == pose.y + MAZE_SPEED * np.sin(pose.angle)


def _walk(track: _Track, rng: np.random.Generator, n: int) -> list[int]:
    """Follow the corridors for `n` frames with straight forward steps only; returns the actions taken.

    Actions are held for a few frames; where less than MAZE_STOP is free ahead (or the step would slide),
    the agent turns towards the more open side until the way ahead is open (as `maze.dmlab_walk`)."""
    maze, start = track.maze, len(track.actions)
    action, hold, until_open = _FORWARD, 0, False
    for _ in range(n):
        pose = track.pose
        if until_open and turned_to_open(maze, pose, REVISIT_TURN if action == _LEFT else -REVISIT_TURN):
            hold, until_open = 0, False
        if hold == 0:
            action = int(rng.choice(len(DMLAB_ACTIONS), p=_WALK_PROBS))
            hold = int(rng.integers(*_HOLDS[action]))
        if action == _FORWARD and (maze_clearance(maze, pose.x, pose.y, pose.angle) < MAZE_STOP
                                   or not _straight(maze, pose)):
            action = turn_to_open_side(lambda a: maze_clearance(maze, pose.x, pose.y, a), pose.angle, rng, _LEFT,
                                       _RIGHT, tie=0.3)
            hold, until_open = REVISIT_CIRCLE, True  # at most a full circle
        track.step(action)
        hold -= 1
    return track.actions[start:]


def _loop(track: _Track, rng: np.random.Generator) -> list[int]:
    """Walk out, turn around, retrace, turn around: the loop's actions, ending at the pose it started from."""
    out = _walk(track, rng, int(rng.integers(*REVISIT_LOOP_OUT)))
    half = [int(rng.choice([_LEFT, _RIGHT]))] * (REVISIT_CIRCLE // 2)
    mirror = {_FORWARD: _FORWARD, _LEFT: _RIGHT, _RIGHT: _LEFT, _NOOP: _NOOP}
    back = half + [mirror[a] for a in reversed(out)] + half
    track.play(back)
    return out + back


def revisit_walk(maze: Maze, rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A walk that revisits: (positions (T, 2) float64, angles (T,), actions (T,) int64), see the module docstring."""
    open_x, open_y = np.nonzero(~maze.walls)
    k = int(rng.integers(len(open_x)))
    track = _Track(maze, MazePose(open_x[k] + 0.5, open_y[k] + 0.5, rng.uniform(0, 2 * np.pi)), frames)
    last_loop = None  # the actions of the last loop, while the agent stands where it started
    while not track.full():
        segment = REVISIT_SEGMENTS[int(rng.choice(len(REVISIT_SEGMENTS), p=REVISIT_PROBS))]
        if segment == "spin":  # whole circles leave the pose as it was: a loop after it can still be repeated
            track.play([int(rng.choice([_LEFT, _RIGHT]))] * (REVISIT_CIRCLE * int(rng.integers(1, 3))))
        elif segment == "repeat" and last_loop is not None:
            track.play(last_loop)
        elif segment in ("loop", "repeat"):
            last_loop = _loop(track, rng)
        else:
            _walk(track, rng, int(rng.integers(*REVISIT_MOVE)))
            last_loop = None
    return np.array(track.pos), np.array(track.angles), np.array(track.actions, np.int64)


def render_revisit_clip(seed: int, frames: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A revisiting maze walk: frames uint8 (T, size, size, 3) and actions int64 (T,) indexing DMLAB_ACTIONS."""
    rng = np.random.default_rng(seed)
    maze = make_maze(rng, cells=int(rng.integers(6, 9)))
    pos, angles, actions = revisit_walk(maze, rng, frames)
    return render_maze(maze, pos, angles, size), actions
