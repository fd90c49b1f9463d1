"""Synthetic DMLab-like and Minecraft-like clips: determinism, learnable motion, action effects, layout, CLI."""

from __future__ import annotations

import json
import zipfile
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from minisora.data.synthetic import (
    CALM_LOOK,
    DMLAB_ACTIONS,
    MAZE_RADIUS,
    MAZE_SPEED,
    MAZE_TURN,
    MINECRAFT_ACTIONS,
    REVISIT_CIRCLE,
    REVISIT_TURN,
    WORLD_EYE,
    MazePose,
    calm_walk,
    clip_seed,
    clip_stem,
    dmlab_walk,
    make_maze,
    make_world,
    minecraft_walk,
    move_in_maze,
    move_in_world,
    render_calm_clip,
    render_dmlab_clip,
    render_maze,
    render_minecraft_clip,
    render_revisit_clip,
    render_world,
    revisit_walk,
    save_npz,
    write_synthetic_dataset,
)
from minisora.data.synthetic.calm import CALM_SPEED, CALM_TURN
from minisora.video import probe_mp4, read_mp4


def horizontal_shift(a: np.ndarray, b: np.ndarray, max_shift: int = 10) -> int:
    """The s for which b[:, x] best matches a[:, x - s] (content moved right by s pixels)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = a.shape[1]
    errs = {s: np.abs(b[:, max_shift + s : w - max_shift + s] - a[:, max_shift : w - max_shift]).mean()
            for s in range(-max_shift, max_shift + 1)}
    return min(errs, key=errs.get)


def vertical_shift(a: np.ndarray, b: np.ndarray, max_shift: int = 10) -> int:
    return horizontal_shift(a.transpose(1, 0, 2), b.transpose(1, 0, 2), max_shift)


# --- clips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "render, size, n_actions",
    [(render_dmlab_clip, 64, len(DMLAB_ACTIONS)), (render_minecraft_clip, 128, len(MINECRAFT_ACTIONS))],
)
def test_clip_shapes_dtypes_and_determinism(render, size, n_actions):
    frames, actions = render(7, 12)
    assert frames.shape == (12, size, size, 3) and frames.dtype == np.uint8
    assert actions.shape == (12,) and actions.dtype == np.int64
    assert actions.min() >= 0 and actions.max() < n_actions
    again, again_actions = render(7, 12)
    assert np.array_equal(frames, again) and np.array_equal(actions, again_actions)
    other, _ = render(8, 12)
    assert not np.array_equal(frames, other)


@pytest.mark.parametrize("render, frames", [(render_dmlab_clip, 40), (render_minecraft_clip, 30)])
def test_consecutive_frames_are_related_and_not_constant(render, frames):
    a = render(0, frames)[0].astype(np.float64)
    b = render(1, frames)[0].astype(np.float64)
    consecutive = np.abs(np.diff(a, axis=0)).mean()
    across_clips = np.abs(a - b).mean()
    assert consecutive < 0.35 * across_clips, (consecutive, across_clips)
    assert np.abs(np.diff(a, axis=0)).mean((1, 2, 3)).max() < 0.6 * across_clips  # no cuts inside a clip
    assert a.std(axis=(1, 2)).max(-1).min() > 8  # no flat frame
    colours = np.unique((a // 32).reshape(-1, 3), axis=0)  # coarse colour bins
    assert len(colours) >= 8


def test_maze_is_connected_with_solid_border():
    maze = make_maze(np.random.default_rng(3), cells=6)
    walls = maze.walls
    assert walls.shape == (13, 13)
    assert walls[0].all() and walls[-1].all() and walls[:, 0].all() and walls[:, -1].all()
    assert len(np.unique(maze.colours[walls].round(3), axis=0)) >= 5  # walls in several colours
    open_cells = {tuple(c) for c in np.argwhere(~walls)}
    start = next(iter(open_cells))
    seen, todo = {start}, deque([start])
    while todo:  # flood fill: every open cell is reachable from every other
        x, y = todo.popleft()
        for nxt in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if nxt in open_cells and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == open_cells
    assert all((2 * i + 1, 2 * j + 1) in open_cells for i in range(6) for j in range(6))


def assert_clear_of_walls(maze, pos):
    """No corner of the camera's square of half-side MAZE_RADIUS is inside a wall, at any frame of pos (T, 2)."""
    for dx in (-MAZE_RADIUS, MAZE_RADIUS):
        for dy in (-MAZE_RADIUS, MAZE_RADIUS):
            assert not maze.walls[np.floor(pos[:, 0] + dx).astype(int), np.floor(pos[:, 1] + dy).astype(int)].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dmlab_camera_never_enters_a_wall_and_actions_match_motion(seed):
    rng = np.random.default_rng(seed)
    maze = make_maze(rng)
    pos, angles, actions = dmlab_walk(maze, rng, 300)
    assert_clear_of_walls(maze, pos)
    # actions[t] is the move from frame t-1 to frame t
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    turn = np.diff(angles)
    names = np.array(DMLAB_ACTIONS)[actions[1:]]
    assert (step[names == "forward"] > 0.05).all() and (turn[names == "forward"] == 0).all()
    assert np.allclose(turn[names == "turn_left"], MAZE_TURN) and np.allclose(turn[names == "turn_right"], -MAZE_TURN)
    assert (step[names != "forward"] == 0).all() and (turn[names == "noop"] == 0).all()
    assert (names == "forward").mean() > 0.3  # the walk goes somewhere
    assert len(set(actions.tolist())) >= 3


def test_dmlab_turns_shift_the_view_in_opposite_directions():
    rng = np.random.default_rng(5)
    maze = make_maze(rng)
    pos, angles, _ = dmlab_walk(maze, rng, 30)
    pose = MazePose(pos[-1, 0], pos[-1, 1], angles[-1])
    views = {}
    for a, name in enumerate(DMLAB_ACTIONS):
        p = move_in_maze(maze, pose, a)
        views[name] = render_maze(maze, np.array([[p.x, p.y]]), np.array([p.angle]))[0]
    base = render_maze(maze, np.array([[pose.x, pose.y]]), np.array([pose.angle]))[0]
    left, right = horizontal_shift(base, views["turn_left"]), horizontal_shift(base, views["turn_right"])
    assert left >= 2 and right <= -2 and abs(left + right) <= 1  # turning left moves the scene right on screen
    assert np.array_equal(views["noop"], base)
    assert np.abs(views["forward"].astype(int) - base).mean() > 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_minecraft_walk_stays_above_ground_and_on_land(seed):
    rng = np.random.default_rng(seed)
    world = make_world(rng)
    players, actions = minecraft_walk(world, rng, 300)
    n = world.height.shape[0]
    cells = np.array([[int(np.floor(p.x)) % n, int(np.floor(p.y)) % n] for p in players])
    feet = np.array([p.feet for p in players])
    ground = world.height[cells[:, 0], cells[:, 1]]
    assert (feet + WORLD_EYE > ground + 0.6).all()  # the eye is never inside a block
    assert (feet >= ground - 1.0).all()  # stepping up one block is eased in, never more
    assert not world.water[cells[:, 0], cells[:, 1]].any()
    names = np.array(MINECRAFT_ACTIONS)[actions]
    assert (names == "forward").mean() > 0.4
    step = np.hypot(*np.diff(np.array([[p.x, p.y] for p in players]), axis=0).T)
    assert (np.minimum(step, n - step)[names[1:] == "forward"] > 0.1).all()  # forward always moves


def test_minecraft_actions_change_the_view():
    rng = np.random.default_rng(4)
    world = make_world(rng)
    players, _ = minecraft_walk(world, rng, 20)
    p = players[-1]
    base = render_world(world, [p])[0]
    after = {name: render_world(world, [move_in_world(world, p, a)])[0] for a, name in enumerate(MINECRAFT_ACTIONS)}
    left, right = horizontal_shift(base, after["turn_left"]), horizontal_shift(base, after["turn_right"])
    assert left >= 2 and right <= -2 and abs(left + right) <= 1
    up, down = vertical_shift(base, after["look_up"]), vertical_shift(base, after["look_down"])
    assert up >= 2 and down <= -2 and abs(up + down) <= 1  # looking up moves the scene down on screen
    assert np.abs(after["forward"].astype(int) - base).mean() > 0.5
    jumped = p
    for _ in range(4):
        jumped = move_in_world(world, jumped, MINECRAFT_ACTIONS.index("jump"))
    assert jumped.feet > p.feet + 0.5
    assert np.abs(render_world(world, [jumped])[0].astype(int) - base).mean() > 0.5
    assert np.array_equal(after["noop"], base)


# --- files ---------------------------------------------------------------------------------------


def test_save_npz_is_byte_deterministic_and_loads_without_pickle(tmp_path):
    video = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    actions = np.array([0, 2], np.int64)
    save_npz(tmp_path / "a.npz", video=video, actions=actions)
    save_npz(tmp_path / "b.npz", video=video, actions=actions)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert [(i.filename, i.date_time, i.compress_type) for i in zf.infolist()] == [
            ("video.npy", (1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED),
            ("actions.npy", (1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED),
        ]
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert np.array_equal(z["video"], video) and np.array_equal(z["actions"], actions)


def test_clip_stem_groups_1000_clips_per_subdir(tmp_path):
    assert clip_stem(tmp_path, "train", 7) == tmp_path / "train" / "0000" / "00007"
    assert clip_stem(tmp_path, "test", 1234) == tmp_path / "test" / "0001" / "01234"
    assert clip_seed(0, "train", 3) != clip_seed(0, "test", 3) != clip_seed(1, "test", 3)


def test_dmlab_dataset_layout_content_and_reuse(tmp_path):
    stats = write_synthetic_dataset("dmlab", tmp_path / "d", clips=3, test_clips=1, frames=8, seed=1, progress=False)
    assert {k: stats[k] for k in ("kind", "clips", "train", "test", "frames", "written", "reused")} == {
        "kind": "dmlab", "clips": 4, "train": 3, "test": 1, "frames": 32, "written": 4, "reused": 0,
    }
    files = sorted(p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d").rglob("*") if p.is_file())
    assert files == ["synthetic.json", "test/0000/00000.npz", "train/0000/00000.npz", "train/0000/00001.npz",
                     "train/0000/00002.npz"]
    with np.load(tmp_path / "d/train/0000/00001.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["actions", "video"]
        video, actions = z["video"], z["actions"]
    expected_video, expected_actions = render_dmlab_clip(clip_seed(1, "train", 1), 8)
    assert video.shape == (8, 64, 64, 3) and video.dtype == np.uint8
    assert np.array_equal(video, expected_video) and np.array_equal(actions, expected_actions)

    # a second run with more clips keeps the complete ones (same bytes, not rewritten)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "d").rglob("*.npz")}
    stats = write_synthetic_dataset("dmlab", tmp_path / "d", clips=4, test_clips=1, frames=8, seed=1, progress=False)
    assert (stats["written"], stats["reused"], stats["clips"]) == (1, 4, 5)
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == v for p, v in before.items())
    assert not (tmp_path / "d" / ".partial").exists()

    # a separate run gives the same bytes; other settings in the same directory are refused
    write_synthetic_dataset("dmlab", tmp_path / "e", clips=3, test_clips=1, frames=8, seed=1, progress=False)
    for p in (tmp_path / "e").rglob("*.npz"):
        assert p.read_bytes() == (tmp_path / "d" / p.relative_to(tmp_path / "e")).read_bytes()
    with pytest.raises(ValueError, match=r"synthetic\.json.*frames: 8 there, 9 now"):
        write_synthetic_dataset("dmlab", tmp_path / "d", clips=3, frames=9, seed=1, progress=False)


def test_minecraft_dataset_mp4_plus_actions_and_workers_do_not_change_bytes(tmp_path):
    one = write_synthetic_dataset("minecraft", tmp_path / "w1", clips=2, test_clips=1, frames=10, seed=2, workers=1,
                                  progress=False)
    two = write_synthetic_dataset("minecraft", tmp_path / "w2", clips=2, test_clips=1, frames=10, seed=2, workers=2,
                                  progress=False)
    assert one["clips"] == two["clips"] == 3 and one["frames"] == 30
    names = sorted(p.relative_to(tmp_path / "w1").as_posix() for p in (tmp_path / "w1").rglob("*.*"))
    assert names == [
        "synthetic.json", "test/0000/00000.mp4", "test/0000/00000.npz",
        "train/0000/00000.mp4", "train/0000/00000.npz", "train/0000/00001.mp4", "train/0000/00001.npz",
    ]
    for p in (tmp_path / "w1").rglob("0*.*"):
        assert p.read_bytes() == (tmp_path / "w2" / p.relative_to(tmp_path / "w1")).read_bytes(), p

    mp4 = tmp_path / "w1/train/0000/00001.mp4"
    assert probe_mp4(mp4) == (10, 128, 128, 20.0)
    decoded = read_mp4(mp4)
    expected, expected_actions = render_minecraft_clip(clip_seed(2, "train", 1), 10)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 4  # H.264 at crf 18: close, not exact
    with np.load(tmp_path / "w1/train/0000/00001.npz", allow_pickle=False) as z:
        assert z.files == ["actions"] and np.array_equal(z["actions"], expected_actions)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown synthetic kind 'atari'"):
        write_synthetic_dataset("atari", "/nonexistent", clips=1)
    with pytest.raises(ValueError, match="frames >= 2.*got 1, 0, 1, 1"):
        write_synthetic_dataset("dmlab", "/nonexistent", clips=1, frames=1)


def test_cli_data_synth(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "dmlab", "--out", str(out), "--clips", "2",
                                      "--test-clips", "1", "--frames", "6"])
    assert result.exit_code == 0, result.output
    assert f"wrote 3 dmlab clips (18 frames) to {out}" in result.output
    assert sorted(p.name for p in Path(out).rglob("*.npz")) == ["00000.npz", "00000.npz", "00001.npz"]
    again = CliRunner().invoke(app, ["data", "synth", "--kind", "dmlab", "--out", str(out), "--clips", "2",
                                      "--test-clips", "1", "--frames", "6"])
    assert again.exit_code == 0, again.output
    assert f"wrote 0 dmlab clips (0 frames) to {out}; reused 3 clips already there" in again.output
    with np.load(out / "test/0000/00000.npz", allow_pickle=False) as z:
        assert z["video"].shape == (6, 64, 64, 3) and z["actions"].shape == (6,)


# Pinned bytes: a change that alters what the generators write must bump GENERATOR_VERSION and these
# digests on purpose. The same digests were checked with numpy's AVX-512 and AVX2 kernels
# (NPY_DISABLE_CPU_FEATURES=X86_V4), so they do not depend on the CPU's SIMD level.
DMLAB_TREE_SHA256 = "d8b64db742d68878742359fa5843267d505255568be3efe05c050face0be98c8"
MINECRAFT_ARRAYS_SHA256 = "8311907cf89db8073bec72577f06d26861f09e702c5b943155ab752d64198301"


def test_output_bytes_are_pinned(tmp_path):
    import hashlib

    write_synthetic_dataset("dmlab", tmp_path, clips=2, test_clips=1, frames=12, seed=3, progress=False)
    tree = hashlib.sha256()
    for p in sorted(tmp_path.rglob("*")):
        if p.is_file():
            tree.update(str(p.relative_to(tmp_path)).encode())
            tree.update(p.read_bytes())
    assert tree.hexdigest() == DMLAB_TREE_SHA256
    video, actions = render_minecraft_clip(5, 6)
    assert hashlib.sha256(video.tobytes() + actions.tobytes()).hexdigest() == MINECRAFT_ARRAYS_SHA256


# --- the calm family (dmlab --motion calm) -------------------------------------------------------


def _still_share(video: np.ndarray) -> float:
    return float((video[1:] == video[:-1]).all(axis=(1, 2, 3)).mean())


def test_calm_clip_shapes_determinism_and_other_look():
    frames, actions = render_calm_clip(7, 40)
    assert frames.shape == (40, 64, 64, 3) and frames.dtype == np.uint8
    assert actions.shape == (40,) and actions.dtype == np.int64
    assert actions.min() >= 0 and actions.max() < len(DMLAB_ACTIONS)
    again, again_actions = render_calm_clip(7, 40)
    assert np.array_equal(frames, again) and np.array_equal(actions, again_actions)
    assert not np.array_equal(frames, render_calm_clip(8, 40)[0])
    walk, _ = render_dmlab_clip(7, 40)
    # the dusk palette: a darker, warmer picture than the default walk's, and a violet sky at the top row
    assert frames.mean() < walk.mean() - 10
    top = frames[:, 0].reshape(-1, 3).mean(0)
    assert top[2] > top[1] and top[0] > top[1]  # violet: red and blue over green (the walk's sky is blue over red)
    assert np.abs(frames[0, 0, 0].astype(int) - np.rint(CALM_LOOK.sky_top * 255 * 1.0)).max() < 30


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calm_walk_stays_out_of_walls_moves_slowly_and_actions_match_motion(seed):
    rng = np.random.default_rng(seed)
    maze = make_maze(rng)
    pos, angles, actions = calm_walk(maze, rng, 300)
    assert_clear_of_walls(maze, pos)
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    turn = np.diff(angles)
    names = np.array(DMLAB_ACTIONS)[actions[1:]]
    assert (step[names == "forward"] > 0).all() and (step <= CALM_SPEED + 1e-12).all()
    assert (turn[names == "forward"] == 0).all() and (step[names != "forward"] == 0).all()
    assert np.allclose(turn[names == "turn_left"], CALM_TURN) and np.allclose(turn[names == "turn_right"], -CALM_TURN)
    assert (turn[names == "noop"] == 0).all()
    assert CALM_TURN < MAZE_TURN and CALM_SPEED < MAZE_SPEED


def test_calm_walk_has_sticky_actions_and_stretches_of_standing_still():
    """Over 8 clips: far more still frames and longer action runs than the default walk."""
    calm_still, walk_still, calm_runs, walk_runs = [], [], [], []
    for seed in range(8):
        video, actions = render_calm_clip(seed, 200)
        calm_still.append(_still_share(video))
        calm_runs.append(len(actions) / (1 + np.count_nonzero(np.diff(actions))))
        video, actions = render_dmlab_clip(seed, 200)
        walk_still.append(_still_share(video))
        walk_runs.append(len(actions) / (1 + np.count_nonzero(np.diff(actions))))
    assert np.mean(calm_still) > 0.15 and np.mean(walk_still) < 0.05
    assert np.mean(calm_runs) > np.mean(walk_runs)
    _, actions = render_calm_clip(3, 300)
    still = (actions == DMLAB_ACTIONS.index("noop")).astype(int)
    longest = max(len(r) for r in "".join(map(str, still)).split("0"))
    assert longest >= 10  # a stretch of standing still


def test_calm_dataset_records_its_motion_and_refuses_mixing(tmp_path):
    stats = write_synthetic_dataset("dmlab", tmp_path / "c", clips=2, test_clips=1, frames=8, seed=1, motion="calm",
                                    progress=False)
    assert stats["clips"] == 3 and stats["written"] == 3
    params = json.loads((tmp_path / "c" / "synthetic.json").read_text())
    assert params["motion"] == "calm" and params["kind"] == "dmlab" and params["seed"] == 1
    with np.load(tmp_path / "c/train/0000/00001.npz", allow_pickle=False) as z:
        video, actions = z["video"], z["actions"]
    expected_video, expected_actions = render_calm_clip(clip_seed(1, "train", 1), 8)
    assert np.array_equal(video, expected_video) and np.array_equal(actions, expected_actions)
    with pytest.raises(ValueError, match=r"synthetic\.json.*motion: 'calm' there, None now"):
        write_synthetic_dataset("dmlab", tmp_path / "c", clips=2, frames=8, seed=1, progress=False)
    write_synthetic_dataset("dmlab", tmp_path / "w", clips=1, frames=8, seed=1, progress=False)
    assert "motion" not in json.loads((tmp_path / "w" / "synthetic.json").read_text())  # the default keeps its bytes
    with pytest.raises(ValueError, match=r"motion: None there, 'calm' now"):
        write_synthetic_dataset("dmlab", tmp_path / "w", clips=1, frames=8, seed=1, motion="calm", progress=False)
    with pytest.raises(ValueError, match="unknown motion 'calm' for synthetic kind 'minecraft'"):
        write_synthetic_dataset("minecraft", tmp_path / "m", clips=1, frames=8, motion="calm", progress=False)
    with pytest.raises(ValueError, match="unknown motion 'jog'"):
        write_synthetic_dataset("dmlab", tmp_path / "j", clips=1, frames=8, motion="jog", progress=False)


def test_cli_data_synth_motion_calm(tmp_path):
    out = tmp_path / "calm"
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "dmlab", "--motion", "calm", "--out", str(out),
                                      "--clips", "1", "--test-clips", "1", "--frames", "6"])
    assert result.exit_code == 0, result.output
    assert f"wrote 2 dmlab clips (12 frames) to {out}" in result.output
    assert json.loads((out / "synthetic.json").read_text())["motion"] == "calm"
    with np.load(out / "train/0000/00000.npz", allow_pickle=False) as z:
        assert np.array_equal(z["video"], render_calm_clip(clip_seed(0, "train", 0), 6)[0])
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "minecraft", "--motion", "calm", "--out",
                                      str(tmp_path / "m"), "--clips", "1"])
    assert result.exit_code == 1 and "--motion calm exists for --kind dmlab only, not minecraft" in result.output
    assert "--motion" in CliRunner().invoke(app, ["data", "synth", "--help"]).output


# --- the revisit family (dmlab --motion revisit): a memory test ----------------------------------
# pinned like the others above (checked with NPY_DISABLE_CPU_FEATURES=X86_V4 too)
REVISIT_ARRAYS_SHA256 = "6eda789d772f3a005770e2632ff7195d54221d96222742e6f57a388d87421992"


def _seen_long_ago_share(video: np.ndarray, gap: int = 16, tol: float = 1.0) -> float:
    """The share of frames t >= gap that some frame j <= t - gap matches to within `tol` mean abs difference."""
    x = video.reshape(len(video), -1).astype(np.float32)
    return float(np.mean([np.abs(x[: t - gap + 1] - x[t]).mean(1).min() < tol for t in range(gap, len(x))]))


def test_revisit_clip_is_pinned_deterministic_and_comes_back_to_what_it_saw():
    import hashlib

    video, actions = render_revisit_clip(5, 120)
    assert video.shape == (120, 64, 64, 3) and video.dtype == np.uint8 and actions.dtype == np.int64
    assert hashlib.sha256(video.tobytes() + actions.tobytes()).hexdigest() == REVISIT_ARRAYS_SHA256
    assert not np.array_equal(video, render_revisit_clip(6, 120)[0])
    # over 3 clips of 300 frames: most frames repeat one seen 16+ frames earlier; in the default walk few do
    revisit = [_seen_long_ago_share(render_revisit_clip(s, 300)[0]) for s in range(3)]
    walk = [_seen_long_ago_share(render_dmlab_clip(s, 300)[0]) for s in range(3)]
    assert np.mean(revisit) > 0.4 and np.mean(walk) < 0.1, (revisit, walk)


@pytest.mark.parametrize("seed", [0, 1])
def test_revisit_walk_moves_straight_turns_at_one_rate_and_returns_to_earlier_poses(seed):
    rng = np.random.default_rng(seed)
    maze = make_maze(rng)
    pos, angles, actions = revisit_walk(maze, rng, 300)
    assert pos.shape == (300, 2) and angles.shape == (300,) and actions.shape == (300,)
    assert_clear_of_walls(maze, pos)
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    turn = np.diff(angles)
    names = np.array(DMLAB_ACTIONS)[actions[1:]]
    assert np.allclose(step[names == "forward"], MAZE_SPEED) and (step[names != "forward"] == 0).all()
    assert np.allclose(turn[names == "turn_left"], REVISIT_TURN) and np.allclose(turn[names == "turn_right"],
                                                                                 -REVISIT_TURN)
    assert (turn[names == "forward"] == 0).all() and REVISIT_CIRCLE == 36
    # poses come back: a frame whose pose (position and heading) equals one 36+ frames before it
    heading = np.stack([np.cos(angles), np.sin(angles)], 1)
    back = [t for t in range(REVISIT_CIRCLE, 300)
            if (np.abs(pos[: t - REVISIT_CIRCLE + 1] - pos[t]).max(1) + np.abs(heading[: t - REVISIT_CIRCLE + 1]
                                                                              - heading[t]).max(1) < 1e-9).any()]
    assert len(back) > 60


def test_cli_data_synth_motion_revisit(tmp_path):
    out = tmp_path / "revisit"
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "dmlab", "--motion", "revisit", "--out", str(out),
                                      "--clips", "1", "--test-clips", "1", "--frames", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "synthetic.json").read_text())["motion"] == "revisit"
    assert "--retrieve-motion 0.09:0,0:10,0:-10,0:0 --retrieve-radius 2" in result.output  # how its actions move
    with np.load(out / "test/0000/00000.npz", allow_pickle=False) as z:
        video, actions = render_revisit_clip(clip_seed(0, "test", 0), 8)
        assert np.array_equal(z["video"], video) and np.array_equal(z["actions"], actions)
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "minecraft", "--motion", "revisit", "--out",
                                      str(tmp_path / "m"), "--clips", "1"])
    assert result.exit_code == 1 and "--motion revisit exists for --kind dmlab only, not minecraft" in result.output
