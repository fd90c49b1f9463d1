"""`doom`: first-person clips from a real game engine, ViZDoom, in DMLab's layout (`video`, `actions` npz).

ViZDoom (MIT; `pip install 'minisora[doom]'`) runs Doom headless on the CPU with Freedoom's free
textures. A clip is one episode on one level: a lit Freedoom 2 map (monsters off, the player
invulnerable) or the package's `my_way_home` scenario (a maze of textured rooms). The engine
renders 4:3 frames (256x192 for 64x64, 512x384 for 128x128); the centre square is cropped and
3x3 pixels are averaged, so both sizes see the same 74-degree view.

Every frame is DOOM_TICS engine tics (35 tics a second: 17.5 frames a second), the buttons held
through them. The action set is six dense ids (DOOM_ACTIONS), each a combination of the binary
buttons MOVE_FORWARD, TURN_LEFT, TURN_RIGHT; Doom's own physics (momentum, sliding along walls,
the slow first tics of a turn) makes the motion smooth. Action convention as the maze:
`actions[t]` is the action held during the tics that end at frame t.

Two seeded policies (`motion`):
- `walk`: actions held for a random number of frames (mostly forward, often forward while
  turning); when the view ahead is closer than DOOM_STOP (depth buffer) or a step went nowhere,
  it turns towards the deeper side until DOOM_OPEN is clear ahead.
- `look`: stands on the spot and looks around: turns left or right and pauses, each held a while.
Before the first recorded frame the clip walks DOOM_BURN_IN frames unrecorded (a random number),
so clips of one level start in different places.

Determinism: the level, the policy's random numbers and the engine's seed all come from the clip's
seed, and a fresh engine renders each clip, so the same seed gives the same bytes (on this engine
version: its renderer, physics and assets decide the pixels, and the policy reads its depth buffer).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from minisora.errors import MinisoraError

DOOM_ACTIONS = ("noop", "forward", "turn_left", "turn_right", "forward_left", "forward_right")
_BUTTONS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1))  # MOVE_FORWARD, TURN_LEFT, TURN_RIGHT
DOOM_LEVELS = ("MAP01", "MAP02", "MAP04", "MAP07", "MAP08", "MAP09", "MAP10", "MAP12", "my_way_home")
# (Freedoom 2 maps whose start areas are lit and open; MAP03, MAP05, MAP06 start in the dark or in a closet)
DOOM_SIZES = {64: "RES_256X192", 128: "RES_512X384"}  # output size -> engine resolution (4:3, 3x the square)
DOOM_MOTIONS = ("walk", "look")
DOOM_TICS = 2  # engine tics per frame
DOOM_FPS = 35 / DOOM_TICS
DOOM_STOP, DOOM_OPEN = 6, 16  # depth-buffer units ahead (about 8 map units each): turn below STOP, until OPEN
DOOM_BURN_IN = (0, 200)  # unrecorded frames walked before the clip, [lo, hi)
DOOM_ATTEMPTS = 5  # episodes tried (with derived seeds) before a clip gives up: the map ended or the player died
WALK_PROBS = (0.05, 0.45, 0.1, 0.1, 0.15, 0.15)  # per DOOM_ACTIONS
WALK_HOLDS = ((3, 10), (8, 30), (4, 16), (4, 16), (4, 16), (4, 16))  # hold ranges [lo, hi) in frames
LOOK_PROBS = (0.3, 0.0, 0.35, 0.35, 0.0, 0.0)
LOOK_HOLDS = ((5, 20), (1, 2), (5, 25), (5, 25), (1, 2), (1, 2))
INSTALL_HINT = "pip install 'minisora[doom]' (or `make setup`, which installs it)"


class DoomError(MinisoraError, RuntimeError):
    """The Doom source cannot run: vizdoom missing, or no episode of a clip lasted its frames."""


def import_vizdoom():
    """The vizdoom module, or a DoomError saying how to install it."""
    try:
        import vizdoom
    except ImportError as e:
        raise DoomError(f"--kind doom needs the vizdoom package, which cannot be imported ({e}); "
                        f"install it: {INSTALL_HINT}") from None
    return vizdoom


def _new_game(vzd, level: str, size: int, seed: int, config_dir: str):
    """A headless engine on `level`, rendering RGB and depth at the resolution for `size`, initialised.

    The engine writes its settings (_vizdoom.ini, ./_vizdoom/) into `config_dir`, not the working directory."""
    game = vzd.DoomGame()
    game.set_doom_config_path(os.path.join(config_dir, "_vizdoom.ini"))
    game.set_doom_game_path(f"{vzd.__path__[0]}/freedoom2.wad")
    if level == "my_way_home":
        game.set_doom_scenario_path(f"{vzd.scenarios_path}/my_way_home.wad")
        level = "MAP01"
    game.set_doom_map(level)
    game.set_screen_resolution(getattr(vzd.ScreenResolution, DOOM_SIZES[size]))
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_depth_buffer_enabled(True)
    for setter in ("hud", "weapon", "crosshair", "messages", "screen_flashes", "decals", "particles"):
        getattr(game, f"set_render_{setter}")(False)
    game.set_window_visible(False)
    game.set_sound_enabled(False)
    game.set_mode(vzd.Mode.PLAYER)
    game.add_game_args("-nomonsters +sv_cheats 1")
    game.set_available_buttons([vzd.Button.MOVE_FORWARD, vzd.Button.TURN_LEFT, vzd.Button.TURN_RIGHT])
    game.set_available_game_variables([vzd.GameVariable.POSITION_X, vzd.GameVariable.POSITION_Y])
    game.set_episode_timeout(0)
    game.set_seed(seed % 2**31)
    here = os.getcwd()
    os.chdir(config_dir)  # the engine process starts here and makes its ./_vizdoom folder here, not in ours
    try:
        game.init()
    finally:
        os.chdir(here)
    return game


class Policy:
    """A seeded random policy over DOOM_ACTIONS: `act(depth, moved)` -> the next action id.

    depth: (H, W) uint8 depth buffer of the current view; moved: whether the last frame moved the player.
    """

    def __init__(self, motion: str, rng: np.random.Generator):
        self.walk = motion == "walk"
        self.probs, self.holds = (WALK_PROBS, WALK_HOLDS) if self.walk else (LOOK_PROBS, LOOK_HOLDS)
        self.rng, self.action, self.hold, self.until_open, self.last_forward = rng, 0, 0, False, False

    def act(self, depth: np.ndarray, moved: bool) -> int:
        h, w = depth.shape
        ahead = float(np.median(depth[2 * h // 5: 3 * h // 5, 2 * w // 5: 3 * w // 5]))
        if self.until_open and ahead > DOOM_OPEN:
            self.hold, self.until_open = 0, False
        if self.hold == 0:
            self.action = int(self.rng.choice(len(DOOM_ACTIONS), p=self.probs))
            self.hold = int(self.rng.integers(*self.holds[self.action]))
        forward, was_forward = _BUTTONS[self.action][0] == 1, self.last_forward
        self.last_forward = forward
        if self.walk and forward and (ahead < DOOM_STOP or (was_forward and not moved)):
            band = depth[h // 3: 2 * h // 3].astype(np.float32)
            left, right = band[:, : w // 2].mean(), band[:, w // 2:].mean()
            self.action = 2 if left > right else 3 if right > left else int(self.rng.choice([2, 3]))
            self.hold, self.until_open, self.last_forward = int(360 / 7), True, False  # at most a full circle
        self.hold -= 1
        return self.action


def _frame(buffer: np.ndarray, size: int) -> np.ndarray:
    """Engine RGB (3s x 4s, 3) -> uint8 (size, size, 3): the centre square, 3x3 pixels averaged."""
    h, w = buffer.shape[:2]
    square = buffer[:, (w - h) // 2: (w - h) // 2 + h].astype(np.float32)
    square = square.reshape(size, 3, size, 3, 3).mean((1, 3))  # (s, 3, s, 3, 3) -> (s, s, 3)
    return np.rint(square).astype(np.uint8)


def _episode(vzd, seed: int, frames: int, size: int, motion: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One episode's clip, or None when the map ended or the player died before `frames` frames."""
    rng = np.random.default_rng(seed)
    level = DOOM_LEVELS[int(rng.integers(len(DOOM_LEVELS)))]
    config_dir = tempfile.mkdtemp(prefix="minisora-doom-")
    game = _new_game(vzd, level, size, int(rng.integers(2**31)), config_dir)
    try:
        game.new_episode()
        game.send_game_command("god")
        walker, policy = Policy("walk", rng), Policy(motion, rng)
        burn_in = int(rng.integers(*DOOM_BURN_IN))
        video, actions = np.empty((frames, size, size, 3), np.uint8), np.empty(frames, np.int64)
        state, moved = game.get_state(), True
        for t in range(-burn_in, frames):
            action = (walker if t < 0 else policy).act(state.depth_buffer, moved)
            before = state.game_variables
            game.make_action(list(_BUTTONS[action]), DOOM_TICS)
            if game.is_episode_finished() or game.is_player_dead():
                return None
            state = game.get_state()
            moved = bool(np.abs(state.game_variables - before).max() > 0.5)
            if t >= 0:
                video[t], actions[t] = _frame(state.screen_buffer, size), action
        return video, actions
    finally:
        game.close()
        shutil.rmtree(config_dir, ignore_errors=True)


def render_doom_clip(seed: int, frames: int, size: int = 64, motion: str = "walk") -> tuple[np.ndarray, np.ndarray]:
    """A Doom clip: frames uint8 (T, size, size, 3) and actions int64 (T,) indexing DOOM_ACTIONS.

    Tries up to DOOM_ATTEMPTS episodes, each from a seed derived from (seed, attempt).
    """
    if size not in DOOM_SIZES or motion not in DOOM_MOTIONS:
        raise ValueError(f"doom clips are {sorted(DOOM_SIZES)} pixels with motion in {DOOM_MOTIONS}; "
                         f"got {size}, {motion!r}")
    vzd = import_vizdoom()
    for attempt in range(DOOM_ATTEMPTS):
        episode_seed = seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        clip = _episode(vzd, episode_seed, frames, size, motion)
        if clip is not None:
            return clip
    raise DoomError(f"doom clip of seed {seed}: {DOOM_ATTEMPTS} episodes ended before {frames} frames")
