"""Retrieved memory (minisora.retrieval): the rule picks the stretch that comes back, training and rollout use the
same rule, the rollout's last frame is the teacher-forcing pass's view, and a saved run records the setting
(older runs load without it)."""

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from minisora.dataset import LatentWindows, sample_latents
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.retrieval import (BLANK, RetrievalWindows, check_setting, loss_context, memory_batch, memory_index,
                                parse_motion, pose_index, poses, recall, with_memory)
from minisora.vae import build_vae, tiny_vae_config


def circle_clip(frames=40, period=12, seed=0) -> torch.Tensor:
    """(frames, 4, 4, 4) latents of a camera turning full circles: frame t shows view t % period, slightly noised
    (so the latest pass of a view is not always the closest)."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(period, 4, 4, 4, generator=g)
    return views[torch.arange(frames) % period] + 0.01 * torch.randn(frames, 4, 4, 4, generator=g)


def test_the_rule_picks_the_frame_that_comes_back_and_never_one_within_reach():
    clip = circle_clip()
    for frame in (17, 25, 30, 39):
        j = memory_index(clip, frame, window=4)
        assert j <= frame - 4 and j % 12 == frame % 12  # the same view, a circle (or two) earlier
        assert (clip[j] - clip[frame]).abs().amax() < 0.1  # what the frame will show
    assert memory_index(clip, 4, window=4) is None and memory_index(clip, 5, window=4) == 1  # no past yet / one
    still = clip.clone()
    still[20:23] = still[23]  # frames within the window's reach equal the key (frame 23): not candidates
    assert memory_index(still, 24, window=4) % 12 == 0  # 11 (view 23 % 12) was seen at 11: frame 12 follows
    still[19] = still[23]  # the newest candidate (24 - 1 - W) now matches exactly: its successor is picked
    assert memory_index(still, 24, window=4) == 20
    assert recall(torch.zeros(30, 4, 4, 4), 20, 15) == 15  # ties: the latest


CIRCLE = parse_motion("0.1:0,0:30,0:-30")  # forward, turn left, turn right: a circle is 12 turns


def test_poses_integrate_the_actions_and_the_rule_picks_the_oldest_frame_at_the_same_pose():
    spin = torch.ones(40, dtype=torch.long)  # turning left on the spot: frame t faces t * 30 degrees
    pose = poses(spin, CIRCLE)
    assert pose.shape == (40, 3) and pose[:, :2].abs().amax() == 0
    torch.testing.assert_close(pose[:, 2], torch.deg2rad(30.0 * torch.arange(40, dtype=torch.float64)))
    for frame in (12, 17, 30, 39):  # the same heading a circle (or three) earlier: the oldest is taken
        assert pose_index(pose, frame, 4, CIRCLE) == frame % 12
    assert pose_index(pose, 3, 4, CIRCLE) is None and pose_index(pose, 4, 4, CIRCLE) == 0  # no past yet / one frame
    held = spin.clone()
    held[5:8] = -1  # the null action (unknown) does not move the camera
    torch.testing.assert_close(poses(held, CIRCLE)[8, 2], torch.tensor(torch.pi * 5 / 6, dtype=torch.float64))
    assert pose_index(pose, 7, 4, CIRCLE) == 3  # 210 degrees against 0..90: the nearest heading, 4 turns away
    assert pose_index(pose, 8, 4, CIRCLE) == 0  # 240 against 0..120: frames 0 and 4 both 4 turns away, the oldest
    # frames 1-3 out, 4-9 half a circle left, 10-12 back, 13-18 half a circle right: the start pose again at 18
    walk = torch.tensor([0, 0, 0, 0] + [1] * 6 + [0, 0, 0] + [2] * 6 + [0])
    pose = poses(walk, CIRCLE)
    torch.testing.assert_close(pose[3], torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(pose[12], torch.tensor([0.0, 0.0, torch.pi], dtype=torch.float64))
    torch.testing.assert_close(pose[18], torch.zeros(3, dtype=torch.float64))
    assert pose_index(pose, 18, 4, CIRCLE) == 0 and pose_index(pose, 19, 4, CIRCLE) == 1  # the way out again


def test_dead_reckoning_is_exact_on_the_revisit_family():
    """The revisit renderer's own poses, seen from frame 0, are the ones its actions integrate to, so the rule
    finds a frame that saw the same view whenever the clip has one out of the window's reach."""
    import numpy as np

    from minisora.data.synthetic import camera_motion, clip_seed
    from minisora.data.synthetic.maze import make_maze
    from minisora.data.synthetic.revisit import revisit_walk

    assert camera_motion("dmlab", "revisit") == "0.09:0,0:10,0:-10,0:0"  # what `data synth` prints for the family
    assert camera_motion("dmlab", "walk") == "0.09:0,0:6,0:-6,0:0" and camera_motion("doom", "walk") is None
    motion = parse_motion(camera_motion("dmlab", "revisit"))
    rng = np.random.default_rng(clip_seed(0, "test", 2))
    maze = make_maze(rng, cells=int(rng.integers(6, 9)))
    pos, angle, actions = revisit_walk(maze, rng, 200)
    pose = poses(torch.from_numpy(actions), motion).numpy()
    c, s = np.cos(angle[0]), np.sin(angle[0])
    seen = (pos - pos[0]) @ np.array([[c, -s], [s, c]])  # the true positions in frame 0's axes
    np.testing.assert_allclose(pose[:, :2], seen, atol=1e-9)
    np.testing.assert_allclose(np.cos(pose[:, 2] - (angle - angle[0])), 1.0, atol=1e-12)
    same = lambda j, u: np.hypot(*(pos[j] - pos[u])) < 1e-9 and np.cos(angle[j] - angle[u]) > 1 - 1e-12  # noqa: E731
    found = 0
    for u in range(20, 200):
        j = pose_index(torch.from_numpy(pose), u, 8, motion)
        assert j <= u - 8
        if any(same(k, u) for k in range(u - 7)):  # a frame at the same pose exists: the rule finds one
            assert same(j, u)
            found += 1
    assert found > 60  # the family comes back often


def test_the_motion_option_is_checked():
    assert parse_motion("") == () and parse_motion("1:0, 0:-7.5") == ((1.0, 0.0), (0.0, -7.5))
    with pytest.raises(ValueError, match="forward:turn_degrees per action id"):
        parse_motion("1,0")
    with pytest.raises(ValueError, match="no action moves the camera"):
        parse_motion("0:0,0:0")
    with pytest.raises(ValueError, match="needs --retrieve-frames > 0 and --use-actions"):
        check_setting(0, 8, "causal", 0, "1:0")
    with pytest.raises(ValueError, match="needs --retrieve-frames > 0 and --use-actions"):
        check_setting(4, 8, "causal", 0, "1:0", use_actions=False)
    with pytest.raises(ValueError, match="--retrieve-radius 2 .* needs a value >= 0 and --retrieve-motion"):
        check_setting(4, 8, "causal", 0, "", radius=2.0)
    with pytest.raises(ValueError, match="--retrieve-radius -1 blanks memory"):
        check_setting(4, 8, "causal", 0, "1:0", radius=-1.0)
    check_setting(4, 8, "causal", 0, "1:0", radius=2.0)


@pytest.mark.parametrize("motion,radius", [((), 0.0), (CIRCLE, 0.0), (CIRCLE, 1.5)],
                         ids=["latents", "pose", "pose-radius"])
def test_training_windows_and_the_rollout_use_the_same_rule(tmp_path, motion, radius):
    from _store_helpers import make_store

    make_store(tmp_path / "store", {"train": [30, 26, 30]}, hw=(4, 4))
    windows = RetrievalWindows(str(tmp_path / "store"), "train", window=5, memory=3, motion=motion, radius=radius)
    assert list(windows.usable) == [0, 1, 2] and windows.frames == 11  # spans of 2 W + 1 frames
    batch = windows.read([0, 2, 1], [0, 13, 15])  # windows start at span + W + 1: 6, 19, 21
    assert batch.mean.shape == (3, 8, 4, 4, 4) and batch.start.tolist() == [6, 19, 21]
    mu, sd = windows.stats_mean.view(1, -1, 1, 1), windows.stats_std.view(1, -1, 1, 1)
    x0 = sample_latents(batch, windows.stats_mean, windows.stats_std)  # a training step's (posterior samples)
    blanks = 0
    for i, (clip, start) in enumerate(((0, 6), (2, 19), (1, 21))):
        full = LatentWindows(str(tmp_path / "store"), "train", 26).read([clip], [0]).mean[0]  # (26, C, h, w)
        lat = (full.float() - mu) / sd  # the clip's normalised latents
        whole = LatentWindows(str(tmp_path / "store"), "train", 26).read([clip], [0])
        pose = poses(whole.actions.long(), motion) if motion else None  # (1, 26, 3)
        found, index = memory_batch(lat[None], start, 5, 3, pose, motion, radius)  # the rollout's retrieval
        rule = [pose_index(pose[0], u, 5, motion, radius) if motion else memory_index(lat, u, 5)
                for u in range(start + 2, start + 5)]
        assert index[0].tolist() == rule
        assert all(j <= u - 5 for j, u in zip(index[0].tolist(), range(start + 2, start + 5)))
        torch.testing.assert_close(batch.mean[i, 3:].float(), full[start:start + 5].float())  # the window
        for k, j in enumerate(index[0].tolist()):  # memory: the frame found, or a blank
            if j == BLANK:
                blanks += 1
                assert pose_index(pose[0], start + 2 + k, 5, motion) >= 0  # a frame exists, just not near enough
                assert found[0, k].abs().max() == 0 and batch.actions[i, k] == -1
                assert x0[i, k].abs().max() < 1e-3  # zero up to the store's float16 rounding of its mean
            else:
                torch.testing.assert_close(batch.mean[i, k].float(), full[j].float())
                assert batch.actions[i, k] == whole.actions[0, j]
    assert (blanks > 0) == (radius > 0) and blanks < 9  # this radius blanks some memory frames, not all
    with pytest.raises(IndexError, match="span .* leaves its 26 latent frames"):
        windows.read([1], [16])


def test_the_loss_leaves_out_the_memory():
    assert loss_context(1, 3, 4)[0].tolist() == [True] * 3 + [False] * 4
    t, context = with_memory(2, 3, torch.full((2, 5), 0.5), torch.tensor([[False, False, True, False, False]] * 2))
    assert t[0].tolist() == [0.0, 0.0, 0.5, 0.5, 0.5] and context[1].tolist() == [True] * 3 + [False] * 2
    assert with_memory(0, 3, t)[1] is None


def tiny_pipe(memory: int, window: int = 4) -> DiTPipeline:
    torch.manual_seed(0)
    dit = VideoDiT(in_channels=4, patch_size=1, hidden_size=32, depth=2, num_heads=2, num_actions=3,
                   attention="causal")
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    torch.manual_seed(0)
    pipe = DiTPipeline(dit, build_vae("kl", tiny_vae_config("kl")).model, FlowMatchEulerDiscreteScheduler(shift=1.0),
                       window_frames=window, latent_size=[4, 4])
    pipe.register_to_config(retrieve_frames=memory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("by_pose,radius", [(False, 0.0), (True, 0.0), (True, 3.0)],
                         ids=["latents", "pose", "pose-radius"])
def test_the_rollout_steps_the_new_frame_as_teacher_forcing_sees_it(by_pose, radius):
    """One Euler step from t = 1: frame t = noise - v, v from a teacher-forcing pass over [memory | window]."""
    pipe, ctx = tiny_pipe(memory=3), circle_clip(frames=31)[None]
    actions = torch.randint(0, 3, (1, 32), generator=torch.Generator().manual_seed(2))
    if by_pose and not radius:  # the camera turns left every frame, as the clip's views do: a circle is 12 frames
        actions = torch.ones(1, 32, dtype=torch.long)
    if by_pose:
        pipe.register_to_config(retrieve_motion="0.1:0,0:30,0:-30", retrieve_radius=radius)
    out = pipe(context_latents=ctx, num_frames=32, num_inference_steps=1, actions=actions,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.kv_cache == "window" == pipe.kv_cache_mode("auto")  # rebuilt per window, whatever was asked
    assert "retrieved memory (3 frames" in pipe.rollout_line("window")
    assert ("by the pose the actions integrate to" in pipe.rollout_line("window")) == by_pose
    assert ("blank beyond 3 actions" in pipe.rollout_line("window")) == (radius > 0)
    noise = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))[:, -1:]  # the window's last
    index = [memory_index(ctx[0], u, 4) for u in (29, 30, 31)]  # the window 28..31's last 3 frames
    if by_pose:
        index = [pose_index(poses(actions[0], CIRCLE), u, 4, CIRCLE, radius) for u in (29, 30, 31)]
        with pytest.raises(ValueError, match="give the rollout its actions"):
            pipe(context_latents=ctx, num_frames=32, num_inference_steps=1, output_type="latent")
    if radius:  # frame 29's nearest pose is 4 actions away, 30's and 31's 2: a blank, then two frames
        assert index == [BLANK, 26, 25]
    elif by_pose:
        assert index == [5, 6, 7]  # the oldest frames at the same heading
    if not radius:
        assert [j % 12 for j in index] == [5, 6, 7] and max(index) <= 27  # views 5, 6, 7, a circle or two earlier
    memory = torch.stack([torch.zeros_like(ctx[0, 0]) if j == BLANK else ctx[0, j] for j in index])[None]
    seq = torch.cat([memory, ctx[:, 28:31], noise], 1)  # [memory | known window frames | the new frame]
    act = torch.cat([torch.tensor([[-1 if j == BLANK else int(actions[0, j]) for j in index]]), actions[:, 28:32]], 1)
    with torch.no_grad():
        t = torch.zeros(1, 7)
        t[:, -1] = 1.0
        v = pipe.transformer(torch.cat([seq[:, :-1], noise], 1), t, act, clean=torch.cat([seq[:, :-1], noise], 1))
    torch.testing.assert_close(out.latents[:, 31:], noise - v[:, -1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.latents[:, :31], ctx)
    plain = tiny_pipe(memory=0)(context_latents=ctx, num_frames=32, num_inference_steps=1, actions=actions,
                                generator=torch.Generator().manual_seed(0), output_type="latent")
    assert plain.kv_cache == "rolling" and (plain.latents[:, 31] - out.latents[:, 31]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="rolls out with chunk 1"):
        pipe(context_latents=ctx, num_frames=34, num_inference_steps=1, chunk=2, output_type="latent")


def test_train_records_the_setting_and_old_runs_load_without_it(tmp_path):
    from typer.testing import CliRunner

    from _store_helpers import synthetic_store
    from cli.main import app

    synthetic_store(tmp_path, clips=2, test_clips=0, frames=12)

    def args(memory, steps):
        return ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--frames", "4",
                "--retrieve-frames", str(memory), "--patch-size", "4", "--batch-size", "2", "--steps", str(steps),
                "--warmup", "1", "--ckpt-every", "2", "--device", "cpu", "--use-actions"]

    r = CliRunner().invoke(app, args(4, 2))
    assert r.exit_code == 0, r.output
    assert "retrieved memory (4 frames of the clip's past before each window)" in r.output
    pipe = DiTPipeline.from_run(tmp_path / "run")
    assert pipe.config.retrieve_frames == 4 and pipe.config.window_frames == 4
    pipe.save_pretrained(tmp_path / "saved")  # a self-contained copy keeps the setting (an __init__ argument)
    assert DiTPipeline.from_run(tmp_path / "saved").config.retrieve_frames == 4
    (meta_file,) = (tmp_path / "run").glob("checkpoints/*/pipeline/minisora_pipeline.json")
    assert json.loads(meta_file.read_text())["retrieve_frames"] == 4
    r = CliRunner().invoke(app, args(2, 4))  # resuming with another --retrieve-frames is another run
    assert r.exit_code != 0 and "was trained with --retrieve-frames 4; this run has --retrieve-frames 2" in r.output
    shutil.copytree(meta_file.parent, tmp_path / "old")  # a pipeline directory from before retrieval
    meta = json.loads(meta_file.read_text())
    del meta["retrieve_frames"]
    (tmp_path / "old" / meta_file.name).write_text(json.dumps(meta))
    old = DiTPipeline.from_run(tmp_path / "old")
    assert old.config.retrieve_frames == 0 and "retrieved" not in old.rollout_line("rolling")
    r = CliRunner().invoke(app, args(5, 2) + ["--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "--retrieve-frames 5 must be in [0, --frames 4]" in r.output


def test_train_by_pose_records_the_motion_and_checks_it_against_the_store(tmp_path):
    from typer.testing import CliRunner

    from _store_helpers import synthetic_store
    from cli.main import app

    synthetic_store(tmp_path, clips=2, test_clips=0, frames=12)  # action ids 0..2 in these clips

    def args(motion, out="run", steps=2):
        return ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / out), "--frames", "4",
                "--retrieve-frames", "2", "--retrieve-motion", motion, "--patch-size", "4", "--batch-size", "2",
                "--steps", str(steps), "--warmup", "1", "--ckpt-every", "2", "--device", "cpu", "--use-actions"]

    r = CliRunner().invoke(app, args("0.09:0,0:6,0:-6,0:0"))
    assert r.exit_code == 0, r.output
    assert "by the pose the actions integrate to (0.09:0,0:6,0:-6,0:0)" in r.output
    pipe = DiTPipeline.from_run(tmp_path / "run")
    assert pipe.config.retrieve_motion == "0.09:0,0:6,0:-6,0:0" and pipe.config.retrieve_frames == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["retrieve_motion"] == "0.09:0,0:6,0:-6,0:0"
    r = CliRunner().invoke(app, args("0.09:0,0:10,0:-10,0:0", steps=4))  # resuming by another table: another run
    assert r.exit_code != 0 and "--retrieve-motion" in r.output and "0:10" in r.output
    r = CliRunner().invoke(app, args("0.09:0,0:6", out="short"))
    assert r.exit_code != 0 and "gives 2 actions' moves" in r.output and "actions up to id 2" in r.output
    r = CliRunner().invoke(app, args("0.09:0,0:6,0:-6,0:0", out="near") + ["--retrieve-radius", "2"])
    assert r.exit_code == 0, r.output
    assert "(0.09:0,0:6,0:-6,0:0), blank beyond 2 actions" in r.output
    assert DiTPipeline.from_run(tmp_path / "near").config.retrieve_radius == 2.0
    r = CliRunner().invoke(app, args("0.09:0,0:6,0:-6,0:0", out="near", steps=4))  # resuming without the radius
    assert r.exit_code != 0 and "--retrieve-radius" in r.output
