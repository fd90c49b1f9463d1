"""`minecraft`: a walk over a blocky heightmap world, drawn by a "voxel space" renderer at 128x128.

The world is periodic fractal noise quantised to whole blocks (water, sand, grass with dirt sides,
stone, snow, leafy trees) with blocky clouds. Each screen column samples the map at a fixed set of
depths, and pixel rows are assigned to the nearest depth whose terrain covers them (a histogram
over rows, no per-pixel loop).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from minisora.data.synthetic.common import MINECRAFT_ACTIONS, downsample, turn_to_open_side

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
        i, j = (int(np.floor(p.x + reach * np.cos(angle + off))) % n,
                int(np.floor(p.y + reach * np.sin(angle + off))) % n)
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
        pitch = float(np.clip(pitch + (WORLD_LOOK if name == "look_up" else -WORLD_LOOK), -WORLD_MAX_PITCH,
                              WORLD_MAX_PITCH))
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


def _render_world_chunk(world: World, pos: np.ndarray, angle: np.ndarray, eye: np.ndarray, pitch: np.ndarray,
                        n: int) -> np.ndarray:
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
    # (t, rows') tangent of elevation
    elev = ((horizon[:, None] - (np.arange(top_rows) + 0.5)) / focal).astype(np.float32)
    sky = _MC_SKY_HORIZON + (_MC_SKY_TOP - _MC_SKY_HORIZON) * np.clip(elev * 2, 0, 1)[..., None]  # (t, rows', 3)
    dist = (CLOUD_HEIGHT - eye[:, None]).astype(np.float32) / np.maximum(elev, 1e-3)  # (t, rows') to the cloud layer
    # (t, rows', n)
    cx = pos[:, 0, None, None].astype(np.float32) + dist[..., None] * ray[:, None, :, 0].astype(np.float32)
    cy = pos[:, 1, None, None].astype(np.float32) + dist[..., None] * ray[:, None, :, 1].astype(np.float32)
    m = world.clouds.shape[0]
    cloud = world.clouds[(cx // CLOUD_BLOCK).astype(np.int64) % m, (cy // CLOUD_BLOCK).astype(np.int64) % m]
    alpha = cloud * (0.9 * np.exp(-dist / 250) * (elev > 0))[..., None]  # (t, rows', n)
    sky = sky[:, :, None] + (_CLOUD - sky[:, :, None]) * alpha[..., None]  # (t, rows', n, 3)
    np.copyto(out[:, :top_rows], sky, where=(first[:, :top_rows] == depth)[..., None])
    return out


def render_world(world: World, players: list[Player], size: int = 128, supersample: int = 1,
                 chunk: int = 25) -> np.ndarray:
    """uint8 frames (T, size, size, 3) seen by each player (eye WORLD_EYE above the feet)."""
    pos = np.array([[p.x, p.y] for p in players], np.float64).reshape(-1, 2)
    angle = np.array([p.angle for p in players], np.float64)
    eye = np.array([p.feet + WORLD_EYE for p in players], np.float64)
    pitch = np.array([p.pitch for p in players], np.float64)
    out = np.empty((len(players), size, size, 3), np.uint8)
    for s in range(0, len(players), chunk):
        sl = slice(s, s + chunk)
        hi = _render_world_chunk(world, pos[sl], angle[sl], eye[sl], pitch[sl], size * supersample)
        out[sl] = downsample(hi, supersample)
    return out


def render_minecraft_clip(seed: int, frames: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A walk over a blocky world: frames uint8 (T, size, size, 3), actions int64 (T,) indexing MINECRAFT_ACTIONS."""
    rng = np.random.default_rng(seed)
    world = make_world(rng)
    players, actions = minecraft_walk(world, rng, frames)
    return render_world(world, players, size), actions
