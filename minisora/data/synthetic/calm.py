"""`dmlab --motion calm`: the maze of `maze.py` walked by a calmer agent and drawn in another light.

Other motion statistics than the default walk, so a recipe is not tuned to one generator:
- sticky actions: when an action's hold runs out, the same action is kept with probability
  CALM_STICKY (for a new hold), so runs are long;
- stretches of standing still: `noop` is common and held for CALM_DURATIONS[noop] frames, and the
  agent pauses (noop) before it turns away from a wall, so many frames repeat their predecessor exactly;
- slow turns and steps: CALM_TURN (2.5 degrees a frame, against 6) and CALM_SPEED (0.05 against 0.09).

The look: a dusk palette (muted stone, moss, slate and rust walls of four planks each with thin
seams, a dark violet-to-amber sky, a slate-and-sand floor), lit more dimly with stronger fog.
Actions are DMLAB_ACTIONS, with the same convention (`actions[t]` is the move into frame t).
"""

from __future__ import annotations

import numpy as np

from minisora.data.synthetic.common import DMLAB_ACTIONS, turn_to_open_side
from minisora.data.synthetic.maze import (MAZE_STOP, Maze, MazeLook, MazePose, make_maze, maze_clearance,
                                          move_in_maze, render_maze, turned_to_open)

CALM_SPEED = 0.05  # grid units per frame
CALM_TURN = np.radians(2.5)  # per frame
CALM_STICKY = 0.5  # chance that an action whose hold ran out is held again
CALM_PROBS = (0.5, 0.1, 0.1, 0.3)  # forward, turn_left, turn_right, noop
CALM_DURATIONS = ((10, 41), (3, 13), (3, 13), (10, 41))  # hold ranges [lo, hi) per action
CALM_PAUSE = (5, 21)  # noop frames before turning away from a wall (CALM_PAUSE_P of the time)
CALM_PAUSE_P = 0.7


def _plank_seams(u: np.ndarray) -> np.ndarray:
    """Distance to the nearest seam of four planks per wall cell."""
    w = u * 4
    return np.abs(w - np.rint(w)) / 4


CALM_LOOK = MazeLook(
    palette=np.array([[120, 112, 100], [86, 110, 74], [84, 96, 118], [140, 90, 64], [104, 84, 110], [150, 140, 110]],
                     np.float32) / 255,
    sky_top=np.array([40, 30, 70], np.float32) / 255,
    sky_horizon=np.array([210, 150, 100], np.float32) / 255,
    floor=np.array([[70, 74, 80], [150, 132, 100]], np.float32) / 255,
    seams=_plank_seams, seam_width=0.02, ambient=0.2, direct=0.8, fog=3.5, side=0.6,
)


def calm_walk(maze: Maze, rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A calm random walk: (positions (T, 2) float64, angles (T,), actions (T,) int64), see the module docstring.

    At a wall (less than MAZE_STOP free ahead) the agent may pause, then turns towards the more open
    side until the way ahead is open (more than MAZE_OPEN and turning further would narrow it).
    """
    open_x, open_y = np.nonzero(~maze.walls)
    k = int(rng.integers(len(open_x)))
    pose = MazePose(open_x[k] + 0.5, open_y[k] + 0.5, rng.uniform(0, 2 * np.pi))
    forward, left, right, noop = range(len(DMLAB_ACTIONS))
    pos, angles, actions = np.empty((frames, 2)), np.empty(frames), np.empty(frames, np.int64)
    action, hold, until_open, pause, paused = noop, 0, False, 0, False
    for t in range(frames):
        if pause > 0:  # standing still in front of a wall; the held action resumes afterwards
            pause -= 1
            pos[t], angles[t], actions[t] = (pose.x, pose.y), pose.angle, noop
            continue
        if until_open:  # stop turning once the way ahead is open and would only narrow with more turning
            if turned_to_open(maze, pose, CALM_TURN if action == left else -CALM_TURN):
                hold, until_open = 0, False
        if hold == 0:
            if t == 0 or rng.random() >= CALM_STICKY:  # sticky: otherwise the same action again
                action = int(rng.choice(len(DMLAB_ACTIONS), p=CALM_PROBS))
            hold = int(rng.integers(*CALM_DURATIONS[action]))
        nxt = move_in_maze(maze, pose, action, CALM_SPEED, CALM_TURN)
        if action == forward and (maze_clearance(maze, pose.x, pose.y, pose.angle) < MAZE_STOP or nxt == pose):
            if not paused and rng.random() < CALM_PAUSE_P:  # pause first, then turn
                pause, paused = int(rng.integers(*CALM_PAUSE)) - 1, True
                pos[t], angles[t], actions[t] = (pose.x, pose.y), pose.angle, noop
                continue
            action = turn_to_open_side(lambda a: maze_clearance(maze, pose.x, pose.y, a), pose.angle, rng, left, right,
                                       tie=0.3)
            hold, until_open, paused = int(2 * np.pi / CALM_TURN), True, False  # at most a full circle
            nxt = move_in_maze(maze, pose, action, CALM_SPEED, CALM_TURN)
        pose, hold = nxt, hold - 1
        pos[t], angles[t], actions[t] = (pose.x, pose.y), pose.angle, action
    return pos, angles, actions


def render_calm_clip(seed: int, frames: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A calm maze walk: frames uint8 (T, size, size, 3) and actions int64 (T,) indexing DMLAB_ACTIONS."""
    rng = np.random.default_rng(seed)
    maze = make_maze(rng, cells=int(rng.integers(6, 9)), palette=CALM_LOOK.palette)
    pos, angles, actions = calm_walk(maze, rng, frames)
    return render_maze(maze, pos, angles, size, look=CALM_LOOK), actions
