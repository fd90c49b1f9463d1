"""Retrieved memory (minisora.retrieval): the rule picks the stretch that comes back, training and rollout use the
same rule, the rollout's last frame is the teacher-forcing pass's view, and a saved run records the setting
(older runs load without it)."""

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from minisora.dataset import LatentWindows
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.retrieval import RetrievalWindows, loss_context, memory_batch, memory_index, recall, with_memory
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


def test_training_windows_and_the_rollout_use_the_same_rule(tmp_path):
    from _store_helpers import make_store

    make_store(tmp_path / "store", {"train": [30, 26, 30]}, hw=(4, 4))
    windows = RetrievalWindows(str(tmp_path / "store"), "train", window=5, memory=3)
    assert list(windows.usable) == [0, 1, 2] and windows.frames == 11  # spans of 2 W + 1 frames
    batch = windows.read([0, 2, 1], [0, 13, 15])  # windows start at span + W + 1: 6, 19, 21
    assert batch.mean.shape == (3, 8, 4, 4, 4) and batch.start.tolist() == [6, 19, 21]
    mu, sd = windows.stats_mean.view(1, -1, 1, 1), windows.stats_std.view(1, -1, 1, 1)
    for i, (clip, start) in enumerate(((0, 6), (2, 19), (1, 21))):
        full = LatentWindows(str(tmp_path / "store"), "train", 26).read([clip], [0]).mean[0]  # (26, C, h, w)
        lat = (full.float() - mu) / sd  # the clip's normalised latents
        found, index = memory_batch(lat[None], start, 5, 3)  # the rollout's retrieval on the same frames
        assert index[0].tolist() == [memory_index(lat, u, 5) for u in range(start + 2, start + 5)]
        assert all(j <= u - 5 for j, u in zip(index[0].tolist(), range(start + 2, start + 5)))
        torch.testing.assert_close(batch.mean[i, :3].float(), full[index[0]].float())  # memory
        torch.testing.assert_close(batch.mean[i, 3:].float(), full[start:start + 5].float())  # then the window
        whole = LatentWindows(str(tmp_path / "store"), "train", 26).read([clip], [0])
        assert batch.actions[i, :3].tolist() == whole.actions[0, index[0]].tolist()
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


def test_the_rollout_steps_the_new_frame_as_teacher_forcing_sees_it():
    """One Euler step from t = 1: frame t = noise - v, v from a teacher-forcing pass over [memory | window]."""
    pipe, ctx = tiny_pipe(memory=3), circle_clip(frames=31)[None]
    actions = torch.randint(0, 3, (1, 32), generator=torch.Generator().manual_seed(2))
    out = pipe(context_latents=ctx, num_frames=32, num_inference_steps=1, actions=actions,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.kv_cache == "window" and "retrieved memory (3 frames" in pipe.rollout_line("rolling")
    noise = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))[:, -1:]  # the window's last
    index = [memory_index(ctx[0], u, 4) for u in (29, 30, 31)]  # the window 28..31's last 3 frames
    assert [j % 12 for j in index] == [5, 6, 7] and max(index) <= 27  # views 5, 6, 7, a circle or two earlier
    seq = torch.cat([ctx[:, index], ctx[:, 28:31], noise], 1)  # [memory | known window frames | the new frame]
    act = torch.cat([actions[:, index], actions[:, 28:32]], 1)
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
