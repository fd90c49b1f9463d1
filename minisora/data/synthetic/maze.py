"""`dmlab`: a first-person walk through a random grid maze, drawn by a numpy raycaster.

The maze is a spanning tree carved by depth-first search, with a few extra walls knocked out to
make loops. The raycaster runs DDA on every screen column of every frame at once and draws
panelled walls with one colour per wall cell, a checkered floor and a sky gradient, at 2x, then
averages down to 64x64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from minisora.data.synthetic.common import DMLAB_ACTIONS, downsample, turn_to_open_side

MAZE_FOV_TAN = np.tan(np.radians(80) / 2)  # half-width of the view plane at distance 1
MAZE_SPEED = 0.09  # grid units per frame (a corridor is 1 unit wide, walls 1 unit high)
MAZE_TURN = np.radians(6.0)  # per frame
MAZE_RADIUS = 0.2  # the camera keeps this far from every wall cell
MAZE_STOP, MAZE_OPEN = 0.4, 1.0  # the walk turns when less than STOP is free ahead, until OPEN is
_MAZE_PALETTE = np.array(
    [[200, 60, 55], [60, 150, 70], [60, 90, 190], [210, 170, 50], [150, 70, 170], [50, 170, 175], [220, 120, 40],
     [200, 200, 200]],
    np.float32,
) / 255
_SKY_TOP, _SKY_HORIZON = np.array([70, 110, 190], np.float32) / 255, np.array([175, 200, 230], np.float32) / 255
_FLOOR = np.array([[115, 100, 80], [95, 82, 66]], np.float32) / 255  # checkered tiles


def _panel_seams(u: np.ndarray) -> np.ndarray:
    """Distance to the nearest seam of two panels per wall cell, u in [0, 1) along the cell."""
    return np.minimum(np.abs(u - 0.5), np.minimum(u, 1 - u))


@dataclass(frozen=True)
class MazeLook:
    """Textures and light: wall palette, sky (or ceiling) gradient, floor tiles, wall seams and shading.

    Walls and floor are lit `ambient + direct * exp(-distance / fog)`; y-facing walls by `side` more.
    """

    palette: np.ndarray  # (P, 3) float32 wall colours in [0, 1]
    sky_top: np.ndarray  # (3,)
    sky_horizon: np.ndarray  # (3,)
    floor: np.ndarray  # (2, 3) checkered tiles
    seams: object = _panel_seams  # u (along a wall cell, [0, 1)) -> distance to the nearest seam
    seam_width: float = 0.05
    ambient: float = 0.3
    direct: float = 0.7
    fog: float = 6
    side: float = 0.75


WALK_LOOK = MazeLook(_MAZE_PALETTE, _SKY_TOP, _SKY_HORIZON, _FLOOR)  # the default family's look


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


def make_maze(rng: np.random.Generator, cells: int = 7, loops: float = 0.2,
              palette: np.ndarray = _MAZE_PALETTE) -> Maze:
    """Carve a `cells` x `cells` maze (random DFS spanning tree) into a (2 cells + 1)^2 grid."""
    g = 2 * cells + 1
    walls = np.ones((g, g), bool)
    seen = np.zeros((cells, cells), bool)
    stack = [(int(rng.integers(cells)), int(rng.integers(cells)))]
    seen[stack[0]] = True
    walls[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = False
    while stack:
        cx, cy = stack[-1]
        nbrs = [(cx + dx, cy + dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= cx + dx < cells and 0 <= cy + dy < cells and not seen[cx + dx, cy + dy]]
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
    colours = palette[rng.integers(len(palette), size=(g, g))]
    return Maze(walls, colours * rng.uniform(0.85, 1.0, size=(g, g, 1)).astype(np.float32))


def _maze_free(maze: Maze, x: float, y: float) -> bool:
    """No wall cell touches the square of half-side MAZE_RADIUS around (x, y)."""
    xs = {int(np.floor(x - MAZE_RADIUS)), int(np.floor(x + MAZE_RADIUS))}
    ys = {int(np.floor(y - MAZE_RADIUS)), int(np.floor(y + MAZE_RADIUS))}
    return not any(maze.walls[i, j] for i in xs for j in ys)


def move_in_maze(maze: Maze, pose: MazePose, action: int, speed: float = MAZE_SPEED,
                 turn: float = MAZE_TURN) -> MazePose:
    """Apply one DMLAB_ACTIONS step; a forward step into a wall slides along it, or stays put."""
    name = DMLAB_ACTIONS[action]
    if name == "forward":
        x, y = pose.x + speed * np.cos(pose.angle), pose.y + speed * np.sin(pose.angle)
        for cx, cy in ((x, y), (x, pose.y), (pose.x, y)):
            if _maze_free(maze, cx, cy):
                return MazePose(cx, cy, pose.angle)
        return pose
    if name in ("turn_left", "turn_right"):
        return replace(pose, angle=pose.angle + (turn if name == "turn_left" else -turn))
    return pose


def maze_clearance(maze: Maze, x: float, y: float, angle: float, reach: float = 3.0) -> float:
    """How far the camera (its MAZE_RADIUS square) could move along `angle`, in steps of 0.05 up to `reach`."""
    c, s = np.cos(angle), np.sin(angle)
    for d in np.arange(0.05, reach, 0.05):
        if not _maze_free(maze, x + d * c, y + d * s):
            return float(d - 0.05)
    return reach


def turned_to_open(maze: Maze, pose: MazePose, turn: float) -> bool:
    """True once the view ahead is open and turning by `turn` more would only narrow it: a turn can stop."""
    ahead = maze_clearance(maze, pose.x, pose.y, pose.angle)
    return ahead > MAZE_OPEN and maze_clearance(maze, pose.x, pose.y, pose.angle + turn) <= ahead


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
            if turned_to_open(maze, pose, MAZE_TURN if action == left else -MAZE_TURN):
                hold, until_open = 0, False
        if hold == 0:
            action = int(rng.choice(4, p=[0.78, 0.09, 0.09, 0.04]))
            hold = int(rng.integers(*durations[action]))
        nxt = move_in_maze(maze, pose, action)
        if action == forward and (maze_clearance(maze, pose.x, pose.y, pose.angle) < MAZE_STOP or nxt == pose):
            action = turn_to_open_side(lambda a: maze_clearance(maze, pose.x, pose.y, a), pose.angle, rng, left, right,
                                       tie=0.3)
            hold, until_open = int(2 * np.pi / MAZE_TURN), True  # at most a full circle
            nxt = move_in_maze(maze, pose, action)
        pose, hold = nxt, hold - 1
        pos[t], angles[t], actions[t] = (pose.x, pose.y), pose.angle, action
    return pos, angles, actions


def _render_maze_chunk(maze: Maze, pos: np.ndarray, angle: np.ndarray, n: int, look: MazeLook) -> np.ndarray:
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
    seam = look.seams(u)
    light = look.ambient + look.direct * np.exp(-perp / look.fog)
    shade = (1 - 0.35 * np.exp(-((seam / look.seam_width) ** 2))) * np.where(side, look.side, 1.0) * light
    wall_rgb = (maze.colours[mx, my] * shade[:, None].astype(np.float32)).reshape(t, 1, n, 3)
    focal = (n / 2) / MAZE_FOV_TAN
    half = (0.5 * focal / perp).astype(np.float32).reshape(t, 1, n)  # half the wall height on screen, pixels
    v = ((np.arange(n, dtype=np.float32) + 0.5) - half_n).reshape(1, n, 1)  # (1, rows, 1) pixels below the centre
    base = v > 0.8 * half  # (t, rows, n) a dark baseboard along the floor
    wall_px = wall_rgb * np.where(base, np.float32(0.55), np.float32(1.0))[..., None]  # (t, rows, n, 3)

    # background: sky gradient above the horizon, checkered floor tiles 0.5 below the eye
    out = np.empty((t, n, n, 3), np.float32)
    lift = (1 - (np.arange(half_n, dtype=np.float32) + 0.5) / half_n)[:, None]  # 1 at the top row, 0 at the horizon
    out[:, :half_n] = (look.sky_horizon + (look.sky_top - look.sky_horizon) * lift)[None, :, None]
    dist = 0.5 * focal / v[:, half_n:]  # (1, rows/2, 1) floor distance seen by each row below the centre
    fx = pos[:, 0, None, None].astype(np.float32) + dist * ray[:, None, :, 0].astype(np.float32)  # (t, rows/2, n)
    fy = pos[:, 1, None, None].astype(np.float32) + dist * ray[:, None, :, 1].astype(np.float32)
    checker = ((np.floor(fx) + np.floor(fy)) % 2).astype(np.int64)
    out[:, half_n:] = look.floor[checker] * (look.ambient + look.direct * np.exp(-dist / look.fog))[..., None]
    np.copyto(out, wall_px, where=(np.abs(v) < half)[..., None])
    return out


def render_maze(maze: Maze, pos: np.ndarray, angle: np.ndarray, size: int = 64, supersample: int = 2, chunk: int = 50,
                look: MazeLook = WALK_LOOK) -> np.ndarray:
    """uint8 frames (T, size, size, 3) seen from pos (T, 2) looking along angle (T,)."""
    pos, angle = np.atleast_2d(pos).astype(np.float64), np.atleast_1d(angle).astype(np.float64)
    out = np.empty((len(pos), size, size, 3), np.uint8)
    for s in range(0, len(pos), chunk):
        hi = _render_maze_chunk(maze, pos[s : s + chunk], angle[s : s + chunk], size * supersample, look)
        out[s : s + chunk] = downsample(hi, supersample)
    return out


def render_dmlab_clip(seed: int, frames: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A maze walk: frames uint8 (T, size, size, 3) and actions int64 (T,) indexing DMLAB_ACTIONS."""
    rng = np.random.default_rng(seed)
    maze = make_maze(rng, cells=int(rng.integers(6, 9)))
    pos, angles, actions = dmlab_walk(maze, rng, frames)
    return render_maze(maze, pos, angles, size), actions

