"""Procedural stand-ins for TECO's DMLab and Minecraft clips: learnable video with actions, offline.

`dmlab`: a first-person walk through a random grid maze (a spanning tree carved by depth-first
search, a few extra walls knocked out to make loops), drawn by a numpy raycaster: DDA on every
screen column of every frame at once, panelled walls with one colour per wall cell, a checkered
floor and a sky gradient, rendered at 2x and averaged down to 64x64.

`minecraft`: a walk over a blocky heightmap world (periodic fractal noise quantised to whole
blocks: water, sand, grass with dirt sides, stone, snow, leafy trees) with blocky clouds, drawn by
a "voxel space" renderer at 128x128: each screen column samples the map at a fixed set of depths,
and pixel rows are assigned to the nearest depth whose terrain covers them (a histogram over
rows, no per-pixel loop).

Both walks are a random but smooth policy over discrete actions: an action is held for several
frames, and a step that would walk into a wall (or up a cliff) is replaced by a turn, so the view
changes gradually and the camera never enters solid cells. Action convention: `actions[t]` is the
action whose effect is frame t, i.e. the move from frame t-1 to frame t (one step is simulated
before the first frame, so `actions[0]` is real too).

On disk (TECO's layout, read by `minisora.data.clips`):
    dmlab:      OUT/{train,test}/0000/00000.npz   video uint8 (T, 64, 64, 3), actions int64 (T,)
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
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minisora.errors import MinisoraError

DMLAB_ACTIONS = ("forward", "turn_left", "turn_right", "noop")
MINECRAFT_ACTIONS = ("forward", "turn_left", "turn_right", "noop", "jump", "look_up", "look_down")
KINDS = ("dmlab", "minecraft")
SPLITS = ("train", "test")
CLIPS_PER_SUBDIR = 1000
GENERATOR_VERSION = 1  # bump when a change alters the rendered pixels
PARAMS_FILE = "synthetic.json"

# --- DMLab-like maze ----------------------------------------------------------------------------
MAZE_FOV_TAN = np.tan(np.radians(80) / 2)  # half-width of the view plane at distance 1
MAZE_SPEED = 0.09  # grid units per frame (a corridor is 1 unit wide, walls 1 unit high)
MAZE_TURN = np.radians(6.0)  # per frame
MAZE_RADIUS = 0.2  # the camera keeps this far from every wall cell
MAZE_STOP, MAZE_OPEN = 0.4, 1.0  # the walk turns when less than STOP is free ahead, until OPEN is
_MAZE_PALETTE = np.array(
    [[200, 60, 55], [60, 150, 70], [60, 90, 190], [210, 170, 50], [150, 70, 170], [50, 170, 175], [220, 120, 40], [200, 200, 200]],
    np.float32,
) / 255
_SKY_TOP, _SKY_HORIZON = np.array([70, 110, 190], np.float32) / 255, np.array([175, 200, 230], np.float32) / 255
_FLOOR = np.array([[115, 100, 80], [95, 82, 66]], np.float32) / 255  # checkered tiles


@dataclass(frozen=True)
class Maze:
    """A grid maze: `walls[x, y]` True for solid cells (the border is solid); RGB per cell in [0, 1]."""

    walls: np.ndarray  # (G, G) bool
    colours: np.ndarray  # (G, G, 3) float32


@dataclass(frozen=True)
class MazePose:
    x: float
    y: float
    angle: float  # radians, counter-clockwise; turning left increases it


def make_maze(rng: np.random.Generator, cells: int = 7, loops: float = 0.2) -> Maze:
    """Carve a `cells` x `cells` maze (random DFS spanning tree) into a (2 cells + 1)^2 grid."""
    g = 2 * cells + 1
    walls = np.ones((g, g), bool)
    seen = np.zeros((cells, cells), bool)
    stack = [(int(rng.integers(cells)), int(rng.integers(cells)))]
    seen[stack[0]] = True
    walls[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = False
    while stack:
        cx, cy = stack[-1]
        nbrs = [(cx + dx, cy + dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)) if 0 <= cx + dx < cells and 0 <= cy + dy < cells and not seen[cx + dx, cy + dy]]
        if not nbrs:
            stack.pop()
            continue
        nx, ny = nbrs[int(rng.integers(len(nbrs)))]
        seen[nx, ny] = True
        walls[2 * nx + 1, 2 * ny + 1] = False
        walls[cx + nx + 1, cy + ny + 1] = False  # the wall cell between the two cells
        stack.append((nx, ny))
    # knock out some interior walls that separate two open cells, making loops and wider views
    ix, iy = np.nonzero(walls[1:-1, 1:-1])
    ix, iy = ix + 1, iy + 1
    between = (~walls[ix - 1, iy] & ~walls[ix + 1, iy]) | (~walls[ix, iy - 1] & ~walls[ix, iy + 1])
    ix, iy = ix[between], iy[between]
    knock = rng.random(len(ix)) < loops
    walls[ix[knock], iy[knock]] = False
    colours = _MAZE_PALETTE[rng.integers(len(_MAZE_PALETTE), size=(g, g))]
    return Maze(walls, colours * rng.uniform(0.85, 1.0, size=(g, g, 1)).astype(np.float32))


def _maze_free(maze: Maze, x: float, y: float) -> bool:
    """No wall cell touches the square of half-side MAZE_RADIUS around (x, y)."""
    xs = {int(np.floor(x - MAZE_RADIUS)), int(np.floor(x + MAZE_RADIUS))}
    ys = {int(np.floor(y - MAZE_RADIUS)), int(np.floor(y + MAZE_RADIUS))}
    return not any(maze.walls[i, j] for i in xs for j in ys)


def move_in_maze(maze: Maze, pose: MazePose, action: int) -> MazePose:
    """Apply one DMLAB_ACTIONS step; a forward step into a wall slides along it, or stays put."""
    name = DMLAB_ACTIONS[action]
    if name == "forward":
        x, y = pose.x + MAZE_SPEED * np.cos(pose.angle), pose.y + MAZE_SPEED * np.sin(pose.angle)
        for cx, cy in ((x, y), (x, pose.y), (pose.x, y)):
            if _maze_free(maze, cx, cy):
                return MazePose(cx, cy, pose.angle)
        return pose
    if name in ("turn_left", "turn_right"):
        return replace(pose, angle=pose.angle + (MAZE_TURN if name == "turn_left" else -MAZE_TURN))
    return pose


def maze_clearance(maze: Maze, x: float, y: float, angle: float, reach: float = 3.0) -> float:
    """How far the camera (its MAZE_RADIUS square) could move along `angle`, in steps of 0.05 up to `reach`."""
    c, s = np.cos(angle), np.sin(angle)
    for d in np.arange(0.05, reach, 0.05):
        if not _maze_free(maze, x + d * c, y + d * s):
            return float(d - 0.05)
    return reach



def turn_to_open_side(clearance, angle: float, rng: np.random.Generator, left: int, right: int, tie: float) -> int:
    """The turn action towards the side with the longest clear view within 90 degrees (random when the
    two sides differ by less than `tie`). clearance(angle) -> distance to the first obstacle."""
    space = {a: max(clearance(angle + sign * np.radians(deg)) for deg in (30, 60, 90)) for a, sign in ((left, 1), (right, -1))}
    if abs(space[left] - space[right]) < tie:
        return int(rng.choice([left, right]))
    return max(space, key=space.get)

def dmlab_walk(maze: Maze, rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth random walk: (positions (T, 2) float64, angles (T,), actions (T,) int64).

    Actions are held for a few frames. Walking up to a wall (less than MAZE_STOP free ahead)
    starts a turn towards the more open side that lasts until the way ahead is open (more than
    MAZE_OPEN, and turning further would narrow it), so the walk follows corridors.
    """
    open_x, open_y = np.nonzero(~maze.walls)
    k = int(rng.integers(len(open_x)))
    pose = MazePose(open_x[k] + 0.5, open_y[k] + 0.5, rng.uniform(0, 2 * np.pi))
    forward, left, right, noop = range(4)
    durations = {forward: (6, 25), left: (3, 13), right: (3, 13), noop: (2, 7)}
    pos, angles, actions = np.empty((frames, 2)), np.empty(frames), np.empty(frames, np.int64)
    action, hold, until_open = noop, 0, False
    for t in range(frames):
        if until_open:  # stop turning once the way ahead is open and would only narrow with more turning
            turn = MAZE_TURN if action == left else -MAZE_TURN
            ahead = maze_clearance(maze, pose.x, pose.y, pose.angle)
            if ahead > MAZE_OPEN and maze_clearance(maze, pose.x, pose.y, pose.angle + turn) <= ahead:
                hold, until_open = 0, False
        if hold == 0:
            action = int(rng.choice(4, p=[0.78, 0.09, 0.09, 0.04]))
            hold = int(rng.integers(*durations[action]))
        nxt = move_in_maze(maze, pose, action)
        if action == forward and (maze_clearance(maze, pose.x, pose.y, pose.angle) < MAZE_STOP or nxt == pose):
            action = turn_to_open_side(lambda a: maze_clearance(maze, pose.x, pose.y, a), pose.angle, rng, left, right, tie=0.3)
            hold, until_open = int(2 * np.pi / MAZE_TURN), True  # at most a full circle
            nxt = move_in_maze(maze, pose, action)
        pose, hold = nxt, hold - 1
        pos[t], angles[t], actions[t] = (pose.x, pose.y), pose.angle, action
    return pos, angles, actions


def _render_maze_chunk(maze: Maze, pos: np.ndarray, angle: np.ndarray, n: int) -> np.ndarray:
    """Float RGB frames (t, n, n, 3) for camera poses pos (t, 2), angle (t,)."""
    t, half_n = len(pos), n // 2
    cam = (np.arange(n) + 0.5) * 2 / n - 1  # (n,) screen x in [-1, 1], left to right
    fwd = np.stack([np.cos(angle), np.sin(angle)], -1)  # (t, 2)
    right = np.stack([np.sin(angle), -np.cos(angle)], -1)  # (t, 2)
    ray = fwd[:, None] + cam[None, :, None] * MAZE_FOV_TAN * right[:, None]  # (t, n, 2)
    rx, ry = ray[..., 0].ravel(), ray[..., 1].ravel()  # (t*n,) one ray per column per frame
    px, py = np.repeat(pos[:, 0], n), np.repeat(pos[:, 1], n)

    # DDA: step every ray cell by cell until it enters a wall (the border is solid, so all do)
    mx, my = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    with np.errstate(divide="ignore"):
        ddx, ddy = np.abs(1 / rx), np.abs(1 / ry)
    sx, sy = np.where(rx < 0, -1, 1), np.where(ry < 0, -1, 1)
    sdx = np.where(rx < 0, px - mx, mx + 1 - px) * ddx
    sdy = np.where(ry < 0, py - my, my + 1 - py) * ddy
    hit = np.zeros(len(rx), bool)
    side = np.zeros(len(rx), bool)  # False: crossed an x boundary last, True: a y boundary
    for _ in range(2 * sum(maze.walls.shape)):
        go = ~hit
        if not go.any():
            break
        step_x = go & (sdx < sdy)
        step_y = go & ~step_x
        mx, sdx = np.where(step_x, mx + sx, mx), np.where(step_x, sdx + ddx, sdx)
        my, sdy = np.where(step_y, my + sy, my), np.where(step_y, sdy + ddy, sdy)
        side = np.where(step_x, False, np.where(step_y, True, side))
        hit |= maze.walls[mx, my]
    with np.errstate(invalid="ignore"):  # inf - inf on axis-parallel rays, never selected
        perp = np.where(side, sdy - ddy, sdx - ddx)  # distance along the view direction
    u = np.where(side, px + perp * rx, py + perp * ry)
    u = u - np.floor(u)  # where along the wall cell the ray hit, in [0, 1)

    # walls: two panels per cell with soft dark seams, darker on y-facing sides and with distance
    seam = np.minimum(np.abs(u - 0.5), np.minimum(u, 1 - u))
    shade = (1 - 0.35 * np.exp(-((seam / 0.05) ** 2))) * np.where(side, 0.75, 1.0) * (0.3 + 0.7 * np.exp(-perp / 6))
    wall_rgb = (maze.colours[mx, my] * shade[:, None].astype(np.float32)).reshape(t, 1, n, 3)
    focal = (n / 2) / MAZE_FOV_TAN
    half = (0.5 * focal / perp).astype(np.float32).reshape(t, 1, n)  # half the wall height on screen, pixels
    v = ((np.arange(n, dtype=np.float32) + 0.5) - half_n).reshape(1, n, 1)  # (1, rows, 1) pixels below the centre
    base = v > 0.8 * half  # (t, rows, n) a dark baseboard along the floor
    wall_px = wall_rgb * np.where(base, np.float32(0.55), np.float32(1.0))[..., None]  # (t, rows, n, 3)

    # background: sky gradient above the horizon, checkered floor tiles 0.5 below the eye
    out = np.empty((t, n, n, 3), np.float32)
    lift = (1 - (np.arange(half_n, dtype=np.float32) + 0.5) / half_n)[:, None]  # 1 at the top row, 0 at the horizon
    out[:, :half_n] = (_SKY_HORIZON + (_SKY_TOP - _SKY_HORIZON) * lift)[None, :, None]
    dist = 0.5 * focal / v[:, half_n:]  # (1, rows/2, 1) floor distance seen by each row below the centre
    fx = pos[:, 0, None, None].astype(np.float32) + dist * ray[:, None, :, 0].astype(np.float32)  # (t, rows/2, n)
    fy = pos[:, 1, None, None].astype(np.float32) + dist * ray[:, None, :, 1].astype(np.float32)
    checker = ((np.floor(fx) + np.floor(fy)) % 2).astype(np.int64)
    out[:, half_n:] = _FLOOR[checker] * (0.3 + 0.7 * np.exp(-dist / 6))[..., None]
    np.copyto(out, wall_px, where=(np.abs(v) < half)[..., None])
    return out


def render_maze(maze: Maze, pos: np.ndarray, angle: np.ndarray, size: int = 64, supersample: int = 2, chunk: int = 50) -> np.ndarray:
    """uint8 frames (T, size, size, 3) seen from pos (T, 2) looking along angle (T,)."""
    pos, angle = np.atleast_2d(pos).astype(np.float64), np.atleast_1d(angle).astype(np.float64)
    out = np.empty((len(pos), size, size, 3), np.uint8)
    for s in range(0, len(pos), chunk):
        hi = _render_maze_chunk(maze, pos[s : s + chunk], angle[s : s + chunk], size * supersample)
        out[s : s + chunk] = _downsample(hi, supersample)
    return out


def render_dmlab_clip(seed: int, frames: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A maze walk: frames uint8 (T, size, size, 3) and actions int64 (T,) indexing DMLAB_ACTIONS."""
    rng = np.random.default_rng(seed)
    maze = make_maze(rng, cells=int(rng.integers(6, 9)))
    pos, angles, actions = dmlab_walk(maze, rng, frames)
    return render_maze(maze, pos, angles, size), actions


# --- Minecraft-like blocky world ----------------------------------------------------------------
WORLD_FOV_TAN = np.tan(np.radians(70) / 2)
WORLD_SPEED = 0.22  # blocks per frame (~4.3 blocks/s at 20 fps, Minecraft's walking speed)
WORLD_TURN = np.radians(4.5)
WORLD_LOOK = np.radians(2.5)
WORLD_MAX_PITCH = np.radians(30)
WORLD_EYE = 1.62  # eye height above the feet, blocks
WORLD_JUMP, WORLD_GRAVITY = 0.42, 0.08  # blocks per frame, per frame^2 (Minecraft's per-tick values)
WORLD_SEA = 6
WORLD_STOP, WORLD_OPEN = 1.25, 3.0  # the walk turns when less than STOP is clear ahead, until OPEN is
CLOUD_HEIGHT, CLOUD_BLOCK = 40.0, 6.0
_DEPTHS = [0.25]
while _DEPTHS[-1] < 44:  # depth samples per column, denser near the camera
    _DEPTHS.append(_DEPTHS[-1] + 0.06 + 0.02 * _DEPTHS[-1])
WORLD_DEPTHS = np.array(_DEPTHS, np.float32)  # (D,)
_BLOCKS = {  # name: (top colour, side colour), RGB 0-255
    "water": ((50, 90, 200), (40, 75, 170)),
    "sand": ((219, 207, 163), (185, 172, 135)),
    "grass": ((95, 159, 53), (134, 96, 67)),
    "stone": ((125, 125, 125), (100, 100, 100)),
    "snow": ((240, 240, 245), (200, 200, 210)),
    "leaves": ((45, 115, 35), (35, 90, 28)),
}
_CLOUD = np.array([250, 250, 252], np.float32) / 255
_MC_SKY_TOP, _MC_SKY_HORIZON = np.array([120, 165, 255], np.float32) / 255, np.array([190, 215, 255], np.float32) / 255


@dataclass(frozen=True)
class World:
    """A periodic heightmap world: block heights and top/side RGB per map cell, indexed [x, y]."""

    height: np.ndarray  # (N, N) float32, whole blocks; water is flat at WORLD_SEA
    top: np.ndarray  # (N, N, 3) float32 in [0, 1]
    side: np.ndarray  # (N, N, 3) float32
    water: np.ndarray  # (N, N) bool; the walk stays on land
    clouds: np.ndarray  # (M, M) bool, one cell per CLOUD_BLOCK x CLOUD_BLOCK blocks


@dataclass(frozen=True)
class Player:
    x: float
    y: float
    angle: float  # radians, counter-clockwise; turning left increases it
    pitch: float = 0.0  # radians, positive looks up
    feet: float = 0.0  # height of the feet, blocks
    vz: float = 0.0  # vertical speed, blocks per frame


def _periodic_noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """Tileable fractal noise (n, n) in [0, 1]: white noise shaped by a 1/f^beta spectrum."""
    f = np.fft.fftfreq(n)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) / radius**beta).real
    return (field - field.min()) / (field.max() - field.min())


def make_world(rng: np.random.Generator, size: int = 128) -> World:
    """Terrain of `size` x `size` blocks (wrapping around): a quarter water, hills up to 12 blocks, trees."""
    noise = _periodic_noise(rng, size, 2.0)
    sea = np.quantile(noise, 0.25)
    land = np.floor((noise - sea) / (noise.max() - sea) * 11.999).astype(np.float32)
    height = WORLD_SEA + np.maximum(land, 0)  # water is flat at sea level
    kind = np.full((size, size), "grass", object)
    kind[land <= 1] = "sand"
    kind[land < 0] = "water"
    kind[land >= 6] = "stone"
    kind[land >= 9] = "snow"
    trees = (kind == "grass") & (rng.random((size, size)) < 0.012)
    kind[trees], height[trees] = "leaves", height[trees] + 4
    top = np.zeros((size, size, 3), np.float32)
    side = np.zeros((size, size, 3), np.float32)
    for name, (t_rgb, s_rgb) in _BLOCKS.items():
        top[kind == name], side[kind == name] = np.array(t_rgb) / 255, np.array(s_rgb) / 255
    jitter = rng.uniform(0.9, 1.05, size=(size, size, 1)).astype(np.float32)  # per-block tint
    clouds = _periodic_noise(rng, 32, 1.2) > 0.62
    return World(height, np.clip(top * jitter, 0, 1), np.clip(side * jitter, 0, 1), kind == "water", clouds)


def _ground(world: World, x: float, y: float) -> float:
    n = world.height.shape[0]
    return float(world.height[int(np.floor(x)) % n, int(np.floor(y)) % n])


def _world_passable(world: World, p: Player, angle: float) -> bool:
    """A step along `angle` neither runs into blocks more than one above the feet nor into water."""
    n = world.height.shape[0]
    for off, reach in ((0.0, 0.55), (0.6, 0.4), (-0.6, 0.4)):
        i, j = int(np.floor(p.x + reach * np.cos(angle + off))) % n, int(np.floor(p.y + reach * np.sin(angle + off))) % n
        if world.height[i, j] > p.feet + 1.0 or world.water[i, j]:
            return False
    return True


def move_in_world(world: World, p: Player, action: int) -> Player:
    """Apply one MINECRAFT_ACTIONS step (then gravity); a forward step into a cliff does not move."""
    name = MINECRAFT_ACTIONS[action]
    x, y, angle, pitch, vz = p.x, p.y, p.angle, p.pitch, p.vz
    if name == "forward" and _world_passable(world, p, angle):
        x, y = x + WORLD_SPEED * np.cos(angle), y + WORLD_SPEED * np.sin(angle)
    elif name in ("turn_left", "turn_right"):
        angle += WORLD_TURN if name == "turn_left" else -WORLD_TURN
    elif name in ("look_up", "look_down"):
        pitch = float(np.clip(pitch + (WORLD_LOOK if name == "look_up" else -WORLD_LOOK), -WORLD_MAX_PITCH, WORLD_MAX_PITCH))
    ground = _ground(world, x, y)
    on_ground = p.feet <= _ground(world, p.x, p.y) and p.vz == 0
    if name == "jump" and on_ground:
        vz = WORLD_JUMP
    feet = p.feet
    if feet < ground:  # stepped onto a higher block: climb smoothly
        feet, vz = min(ground, feet + 0.34), 0.0
    elif feet > ground or vz > 0:  # in the air: move, then fall
        feet, vz = feet + vz, vz - WORLD_GRAVITY
        if feet <= ground:
            feet, vz = ground, 0.0
    return Player(x, y, angle, pitch, feet, vz)


def world_clearance(world: World, p: Player, angle: float, reach: float = 4.0) -> float:
    """How far the player could walk along `angle` (steps of 0.25, at most one block up per step, no water)."""
    n = world.height.shape[0]
    c, s, level = np.cos(angle), np.sin(angle), p.feet
    for d in np.arange(0.25, reach, 0.25):
        i, j = int(np.floor(p.x + d * c)) % n, int(np.floor(p.y + d * s)) % n
        if world.height[i, j] > level + 1.0 or world.water[i, j]:
            return float(d)
        level = world.height[i, j]
    return reach


def minecraft_walk(world: World, rng: np.random.Generator, frames: int) -> tuple[list[Player], np.ndarray]:
    """A smooth random walk on land: the player after each frame's action, and actions (T,) int64.

    Actions are held for a few frames. Walking up to a cliff, a tree or water (less than
    WORLD_STOP clear ahead) starts a turn towards the more open side that lasts until the way
    ahead is open again; looking up or down drifts back towards the horizon.
    """
    n = world.height.shape[0]
    land = np.argwhere(~world.water & (world.height < WORLD_SEA + 6))  # start on low land, not on a tree
    x, y = land[int(rng.integers(len(land)))] + 0.5
    p = Player(x, y, rng.uniform(0, 2 * np.pi), 0.0, _ground(world, x, y))
    forward, left, right, noop, jump, up, down = range(7)
    probs = np.array([0.55, 0.12, 0.12, 0.06, 0.05, 0.05, 0.05])
    durations = {forward: (6, 25), left: (3, 13), right: (3, 13), noop: (2, 9), jump: (1, 4), up: (2, 7), down: (2, 7)}
    players, actions = [], np.empty(frames, np.int64)
    action, hold, until_open = noop, 0, False
    for t in range(frames):
        if until_open and world_clearance(world, p, p.angle) >= WORLD_OPEN:
            hold, until_open = 0, False
        if hold == 0:
            action = int(rng.choice(7, p=probs))
            if action in (up, down) and abs(p.pitch) > np.radians(5) and rng.random() < 0.75:
                action = down if p.pitch > 0 else up  # mostly look back towards the horizon
            hold = int(rng.integers(*durations[action]))
        nxt = move_in_world(world, p, action)
        if action == forward and (world_clearance(world, p, p.angle) < WORLD_STOP or (nxt.x, nxt.y) == (p.x, p.y)):
            action = turn_to_open_side(lambda a: world_clearance(world, p, a), p.angle, rng, left, right, tie=0.5)
            hold, until_open = int(2 * np.pi / WORLD_TURN), True  # at most a full circle
            nxt = move_in_world(world, p, action)
        p, hold = replace(nxt, x=nxt.x % n, y=nxt.y % n), hold - 1
        players.append(p)
        actions[t] = action
    return players, actions


def _render_world_chunk(world: World, pos: np.ndarray, angle: np.ndarray, eye: np.ndarray, pitch: np.ndarray, n: int) -> np.ndarray:
    """Float RGB frames (t, n, n, 3) for poses pos (t, 2), angle, eye height, pitch (t,)."""
    t, size, depth = len(pos), world.height.shape[0], len(WORLD_DEPTHS)
    cam = (np.arange(n) + 0.5) * 2 / n - 1  # (n,) screen x in [-1, 1], left to right
    fwd = np.stack([np.cos(angle), np.sin(angle)], -1)  # (t, 2)
    right = np.stack([np.sin(angle), -np.cos(angle)], -1)
    ray = fwd[:, None] + cam[None, :, None] * WORLD_FOV_TAN * right[:, None]  # (t, n, 2)
    focal = (n / 2) / WORLD_FOV_TAN
    horizon = n / 2 + focal * np.tan(pitch)  # (t,) screen row of the horizon

    # sample the map along every column: (t, columns, D)
    z = WORLD_DEPTHS
    mx = np.floor(pos[:, 0, None, None] + z * ray[..., 0:1]).astype(np.int64) % size
    my = np.floor(pos[:, 1, None, None] + z * ray[..., 1:2]).astype(np.int64) % size
    cell = mx * size + my  # (t, n, D) flat map index
    h = world.height.ravel()[cell]
    top_row = horizon[:, None, None] - (h - eye[:, None, None]) * focal / z  # screen row of each sample's top
    # row r shows the first depth whose (running-min) top row is at or above it: that depth's
    # index is the number of depths whose top is still below r, counted with a histogram
    cover = np.clip(np.ceil(np.minimum.accumulate(top_row, axis=2)), 0, n).astype(np.int64)  # (t, n, D)
    offsets = (np.arange(t * n) * (n + 1)).reshape(t, n, 1)
    counts = np.bincount((cover + offsets).ravel(), minlength=t * n * (n + 1)).reshape(t, n, n + 1)
    first = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # (t, n, rows): depth index, D = sky
    first = first.transpose(0, 2, 1)  # (t, rows, n)
    d = np.minimum(first, depth - 1)
    riser = np.concatenate([np.zeros_like(h[..., :1], bool), h[..., 1:] > h[..., :-1]], -1)  # a block's side face
    fi, ci = np.arange(t)[:, None, None], np.arange(n)[None, None, :]  # gather (t, rows, n) from (t, n, D)
    hit = cell[fi, ci, d] + size * size * riser[fi, ci, d]  # index into top colours, then side colours
    out = np.concatenate([world.top, world.side]).reshape(-1, 3)[hit]  # (t, rows, n, 3)
    fog = np.clip((z[d] - 0.45 * z[-1]) / (0.55 * z[-1]), 0, 1)[..., None]
    out += (_MC_SKY_HORIZON - out) * fog

    # sky (only rows above the highest horizon): a gradient, plus a flat layer of blocky clouds
    top_rows = int(np.clip(np.ceil(horizon.max()), 0, n))
    elev = ((horizon[:, None] - (np.arange(top_rows) + 0.5)) / focal).astype(np.float32)  # (t, rows') tangent of elevation
    sky = _MC_SKY_HORIZON + (_MC_SKY_TOP - _MC_SKY_HORIZON) * np.clip(elev * 2, 0, 1)[..., None]  # (t, rows', 3)
    dist = (CLOUD_HEIGHT - eye[:, None]).astype(np.float32) / np.maximum(elev, 1e-3)  # (t, rows') to the cloud layer
    cx = pos[:, 0, None, None].astype(np.float32) + dist[..., None] * ray[:, None, :, 0].astype(np.float32)  # (t, rows', n)
    cy = pos[:, 1, None, None].astype(np.float32) + dist[..., None] * ray[:, None, :, 1].astype(np.float32)
    m = world.clouds.shape[0]
    cloud = world.clouds[(cx // CLOUD_BLOCK).astype(np.int64) % m, (cy // CLOUD_BLOCK).astype(np.int64) % m]
    alpha = cloud * (0.9 * np.exp(-dist / 250) * (elev > 0))[..., None]  # (t, rows', n)
    sky = sky[:, :, None] + (_CLOUD - sky[:, :, None]) * alpha[..., None]  # (t, rows', n, 3)
    np.copyto(out[:, :top_rows], sky, where=(first[:, :top_rows] == depth)[..., None])
    return out


def render_world(world: World, players: list[Player], size: int = 128, supersample: int = 1, chunk: int = 25) -> np.ndarray:
    """uint8 frames (T, size, size, 3) seen by each player (eye WORLD_EYE above the feet)."""
    pos = np.array([[p.x, p.y] for p in players], np.float64).reshape(-1, 2)
    angle = np.array([p.angle for p in players], np.float64)
    eye = np.array([p.feet + WORLD_EYE for p in players], np.float64)
    pitch = np.array([p.pitch for p in players], np.float64)
    out = np.empty((len(players), size, size, 3), np.uint8)
    for s in range(0, len(players), chunk):
        sl = slice(s, s + chunk)
        hi = _render_world_chunk(world, pos[sl], angle[sl], eye[sl], pitch[sl], size * supersample)
        out[sl] = _downsample(hi, supersample)
    return out


def render_minecraft_clip(seed: int, frames: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A walk over a blocky world: frames uint8 (T, size, size, 3), actions int64 (T,) indexing MINECRAFT_ACTIONS."""
    rng = np.random.default_rng(seed)
    world = make_world(rng)
    players, actions = minecraft_walk(world, rng, frames)
    return render_world(world, players, size), actions


def _downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Float (t, n*f, n*f, 3) in [0, 1] -> uint8 (t, n, n, 3), averaging f x f blocks."""
    if factor > 1:
        t, n = rgb.shape[0], rgb.shape[1] // factor
        rgb = rgb.reshape(t, n, factor, n, factor, 3).mean((2, 4))  # (t, n, f, n, f, 3) -> (t, n, n, 3)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


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


def _write_clip(job: _ClipJob) -> bool:
    """Render and write one clip unless it is already complete; True if it was written."""
    stem = clip_stem(job.root, job.split, job.index)
    final = stem.with_suffix(".npz" if job.kind == "dmlab" else ".mp4")
    if final.exists():
        return False
    stem.parent.mkdir(parents=True, exist_ok=True)
    partial = job.root / ".partial"
    partial.mkdir(exist_ok=True)
    tmp = partial / f"{job.split}-{job.index:05d}-{os.getpid()}"
    seed = clip_seed(job.seed, job.split, job.index)
    if job.kind == "dmlab":
        video, actions = render_dmlab_clip(seed, job.frames)
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
        diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise SynthError(f"{path}: this directory holds synthetic clips made with other settings ({detail}); "
                             "choose a new --out or repeat those settings")
        return
    tmp = root / f".{PARAMS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, path)


def write_synthetic_dataset(
    kind: str, out: str | Path, *, clips: int, test_clips: int = 0, frames: int = 300, seed: int = 0, workers: int = 1, progress: bool = True
) -> dict:
    """Write `clips` train and `test_clips` test clips of `kind` under `out` in TECO's layout.

    Complete clips already there (from an interrupted or smaller run with the same kind, frames
    and seed) are kept. Returns {"kind", "clips" (train + test), "train", "test", "frames" (all
    clips), "written", "reused", "seconds"}.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    if clips < 0 or test_clips < 0 or frames < 2 or workers < 1:
        raise ValueError(f"need clips >= 0, test_clips >= 0, frames >= 2, workers >= 1; got {clips}, {test_clips}, {frames}, {workers}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise SynthError(f"{root}: is an existing file; --out must be a new or existing directory")
    root.mkdir(parents=True, exist_ok=True)
    _check_params(root, {"generator": "minisora.data.synthetic", "version": GENERATOR_VERSION, "kind": kind, "frames": frames, "seed": seed})
    jobs = [_ClipJob(kind, root, split, i, frames, seed) for split, n in (("train", clips), ("test", test_clips)) for i in range(n)]
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
    return {"kind": kind, "clips": n, "train": clips, "test": test_clips, "frames": n * frames, "written": written, "reused": n - written, "seconds": seconds}
