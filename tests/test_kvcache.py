"""Frame-causal attention and the KV cache: the mask, RoPE offsets, config round trips, and rollouts
with the cache against the window recompute, frame for frame, on small random causal models.

Tolerance: the cache changes only the order of float32 operations (fewer tokens per matmul, keys
rotated at absolute rather than window positions), so rollouts agree to ATOL = 1e-4 on latents of
unit scale; a real difference (a wrong mask, position or cache entry) is 1e-2 or more.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from _store_helpers import synthetic_store
from minisora.kv_cache import KVCache
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.vae import build_vae, tiny_vae_config

ATOL = 1e-4
WINDOW = 6


def random_dit(depth=2, num_actions=3, attention="causal", seed=0) -> VideoDiT:
    """A small DiT whose weights are all random (a fresh adaLN-Zero DiT would predict v = 0)."""
    torch.manual_seed(seed)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=depth, num_heads=2, num_actions=num_actions,
                   attention=attention)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    return dit.eval()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae("kl", tiny_vae_config("kl"))


def make_pipe(vae, depth=2, num_actions=3) -> DiTPipeline:
    pipe = DiTPipeline(random_dit(depth, num_actions), vae.model, FlowMatchEulerDiscreteScheduler(shift=1.0),
                       window_frames=WINDOW, latent_size=[4, 4])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rollout(pipe, mode, chunk, actions, guidance, frames=3 * WINDOW, context=2, context_t=0.0):
    ctx = torch.randn(1, context, 4, 4, 4, generator=torch.Generator().manual_seed(1)) if context else None
    out = pipe(context_latents=ctx, num_frames=frames, num_inference_steps=3, chunk=chunk, actions=actions,
               guidance=guidance, kv_cache=mode, generator=torch.Generator().manual_seed(0), output_type="latent",
               context_t=context_t)
    return out


# ------------------------------------------------------------------------------ the model
def test_causal_mask_blocks_later_frames():
    model = random_dit(num_actions=0)
    x = torch.randn(1, 5, 4, 4, 4)
    t = torch.rand(1, 5)
    with torch.no_grad():
        base = model(x, t)
        y = x.clone()
        y[:, 3] += 1.0  # perturb frame 3
        moved = model(y, t)
    torch.testing.assert_close(moved[:, :3], base[:, :3], rtol=0, atol=1e-6)  # earlier frames: unchanged
    assert (moved[:, 3:] - base[:, 3:]).abs().amax() > 1e-2  # frame 3 itself and later ones see it

    full = random_dit(num_actions=0, attention="full")
    with torch.no_grad():
        assert (full(y, t)[:, :3] - full(x, t)[:, :3]).abs().amax() > 1e-2  # full attention does see the future


def test_same_relative_offsets_give_the_same_outputs():
    """RoPE is relative: the same frames at absolute positions 0.. or 1000.. give the same velocity."""
    model = random_dit(num_actions=0)
    x, t = torch.randn(1, 4, 4, 4, 4), torch.zeros(1, 4)
    with torch.no_grad():
        at_zero = model(x[:, 1:], t[:, 1:], kv_cache=_prefilled(model, x[:, :1], 0))
        far = model(x[:, 1:], t[:, 1:], kv_cache=_prefilled(model, x[:, :1], 1000))
        plain = model(x, t)[:, 1:]
    torch.testing.assert_close(far, at_zero, rtol=0, atol=ATOL)
    torch.testing.assert_close(at_zero, plain, rtol=0, atol=ATOL)  # the cache changes nothing either


def _prefilled(model, clean, position):
    cache = KVCache(len(model.blocks), position=position)
    model(clean, torch.zeros(clean.shape[:2]), kv_cache=cache, update_cache=True)
    assert (cache.frames, cache.position, cache.tokens) == (clean.shape[1], position + clean.shape[1], 4)
    return cache


def test_kv_cache_rolls_keeping_the_newest_frames():
    model = random_dit(num_actions=0)
    cache = _prefilled(model, torch.randn(1, 5, 4, 4, 4), position=3)
    k_before = cache.keys[1][:, :, 2 * 4:].clone()
    cache.keep_last(3)
    assert cache.frames == 3 and cache.position == 8 and cache.keys[1].shape[2] == 3 * 4
    assert torch.equal(cache.keys[1], k_before)


@pytest.mark.parametrize("short_frames", [0, 2])
def test_commit_fills_the_cache_as_a_committing_forward_does(short_frames):
    """`commit` (a rollout's per-frame cache update) skips the last block's attention and MLP and the output layer;
    the cache it leaves is bit for bit the one of forward(update_cache=True), long-short memory included."""
    torch.manual_seed(1)
    model = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, num_actions=3, attention="causal",
                     short_frames=short_frames)
    x, a = torch.randn(1, 5, 4, 4, 4), torch.randint(0, 3, (1, 5))
    caches = [KVCache(2, position=7), KVCache(2, position=7)]
    with torch.no_grad():
        for cache in caches:  # the context at once, then frame by frame with a rolling window of 3
            model(x[:, :2], torch.zeros(1, 2), a[:, :2], kv_cache=cache, update_cache=True)
        for i in range(2, 5):
            args = (x[:, i:i + 1], torch.zeros(1, 1))
            model(*args, a[:, i:i + 1], kv_cache=caches[0], update_cache=True)
            assert model.commit(*args, caches[1], a[:, i:i + 1]) is None
            for cache in caches:
                cache.keep_last(3)
    ref, got = caches
    assert (got.frames, got.position, got.memory_frames) == (ref.frames, ref.position, ref.memory_frames) == \
        (3 if not short_frames else 1, 12, 3 if short_frames else 0)
    for layer in range(2):
        assert all(torch.equal(g, r) for g, r in zip(got.past(layer), ref.past(layer)))  # keys, values
        if short_frames:
            assert all(torch.equal(g, r) for g, r in zip(got._memory[layer].live(), ref._memory[layer].live()))


def test_cached_passes_remember_each_time_and_action_until_the_weights_change():
    """A rollout's passes reuse the modulations of a (times, actions) pair from the cache (`KVCache.remember`), with
    the velocity of an uncached pass; weights changed in place (a load, a training step) are never served stale."""
    model = random_dit()
    x, a = torch.randn(1, 3, 4, 4, 4), torch.randint(0, 3, (1, 3))
    cache = KVCache(2)
    with torch.no_grad():
        model.commit(x[:, :2], torch.zeros(1, 2), cache, a[:, :2])
        steps = [model(x[:, 2:], torch.full((1, 1), t), a[:, 2:], kv_cache=cache) for t in (0.75, 0.5, 0.75)]
        assert len(cache._remembered) == 3  # the commit's t = 0 and the two times of the steps
        assert torch.equal(steps[0], steps[2])
        full = model(x, torch.tensor([[0.0, 0.0, 0.5]]), a)[:, 2:]
        torch.testing.assert_close(steps[1], full, rtol=0, atol=1e-5)
        model.blocks[1].adaLN_modulation[-1].weight.mul_(0.5)  # in place, as a load or an optimizer step
        moved = model(x[:, 2:], torch.full((1, 1), 0.75), a[:, 2:], kv_cache=cache)
    with torch.enable_grad():  # nothing remembered with gradients: the modulations of the weights as they are
        fresh = model(x[:, 2:], torch.full((1, 1), 0.75), a[:, 2:], kv_cache=cache)
    assert torch.equal(moved, fresh) and (moved - steps[0]).abs().amax() > 1e-3


def test_attention_mode_round_trips_and_old_configs_load_as_full(tmp_path):
    random_dit(attention="causal").save_pretrained(tmp_path / "causal")
    assert VideoDiT.from_pretrained(tmp_path / "causal").config.attention == "causal"
    random_dit(attention="full").save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["attention"]  # a checkpoint from before the option
    cfg_path.write_text(json.dumps(cfg))
    assert VideoDiT.from_pretrained(tmp_path / "old").config.attention == "full"
    with pytest.raises(ValueError, match="attention must be one of .* got 'sparse'"):
        VideoDiT(attention="sparse")


def test_a_cache_needs_a_causal_model(vae):
    full = random_dit(attention="full")
    with pytest.raises(ValueError, match="KV cache needs a causal model; this one has attention='full'"):
        full(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 2), kv_cache=KVCache(2))
    pipe = DiTPipeline(full, vae.model, FlowMatchEulerDiscreteScheduler(), window_frames=WINDOW, latent_size=[4, 4])
    assert pipe.kv_cache_mode("auto") == "off"
    with pytest.raises(ValueError, match="kv_cache='rolling' needs a causal transformer"):
        pipe.kv_cache_mode("rolling")


# ------------------------------------------------------------------------------ rollouts
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("with_actions,guidance", [(False, 1.0), (True, 1.0), (True, 2.5)])
def test_window_cache_rollout_equals_the_recompute_frame_for_frame(vae, chunk, with_actions, guidance):
    """A 3-window rollout (18 latent frames, window 6, 2 blocks) with the per-window cache."""
    pipe = make_pipe(vae)
    actions = torch.randint(0, 3, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2)) if with_actions else None
    ref = rollout(pipe, "off", chunk, actions, guidance)
    out = rollout(pipe, "window", chunk, actions, guidance)
    assert (ref.kv_cache, out.kv_cache) == ("off", "window")
    assert out.latents.shape == ref.latents.shape == (1, 3 * WINDOW, 4, 4, 4)
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=ATOL)
    assert ref.latents[:, 2:].abs().mean() > 0.1  # the frames were generated, not left at zero


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("with_actions,guidance", [(False, 1.0), (True, 2.5)])
def test_window_cache_shows_noised_context_as_the_recompute_does(vae, chunk, with_actions, guidance):
    """context_t > 0: every window shows its known frames noised by its own draws; the window cache commits them
    so, at t = context_t, and "auto" takes it. The rolling cache, which keeps each frame once, refuses."""
    pipe = make_pipe(vae)
    actions = torch.randint(0, 3, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2)) if with_actions else None
    ref = rollout(pipe, "off", chunk, actions, guidance, context_t=0.2)
    out = rollout(pipe, "auto", chunk, actions, guidance, context_t=0.2)
    assert (ref.kv_cache, out.kv_cache) == ("off", "window")
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=ATOL)
    clean = rollout(pipe, "window", chunk, actions, guidance)
    assert (clean.latents[:, 2:] - ref.latents[:, 2:]).abs().amax() > 1e-2  # the noise level reached the model
    with pytest.raises(ValueError, match="context_t=0.2 \\(--context-noise\\) shows every window's known frames "
                                         "noised .* use kv_cache='window' \\(--kv-cache window"):
        rollout(pipe, "rolling", chunk, actions, guidance, context_t=0.2)


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("with_actions,guidance", [(False, 1.0), (True, 2.5)])
def test_rolling_cache_rollout_equals_the_recompute_where_it_must(vae, chunk, with_actions, guidance):
    """The rolling cache adds each generated frame once. Within the first window, and over 3 windows of a
    one-block model (whose keys depend only on their own frame), it equals the recompute; with 2 blocks a
    cached frame's second-block keys also saw the frames before the window, so later windows differ."""
    actions = torch.randint(0, 3, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2)) if with_actions else None
    one = make_pipe(vae, depth=1)
    torch.testing.assert_close(rollout(one, "rolling", chunk, actions, guidance).latents,
                               rollout(one, "off", chunk, actions, guidance).latents, rtol=0, atol=ATOL)
    two = make_pipe(vae, depth=2)
    rolled, ref = rollout(two, "rolling", chunk, actions, guidance), rollout(two, "off", chunk, actions, guidance)
    assert rolled.kv_cache == "rolling" and two.kv_cache_mode("auto") == "rolling"
    torch.testing.assert_close(rolled.latents[:, :WINDOW], ref.latents[:, :WINDOW], rtol=0, atol=ATOL)
    assert (rolled.latents[:, WINDOW:] - ref.latents[:, WINDOW:]).abs().amax() > 1e-2


def test_unconditional_rollout_with_the_cache(vae):
    pipe = make_pipe(vae, num_actions=0)
    ref = rollout(pipe, "off", 2, None, 1.0, frames=2 * WINDOW + 1, context=0)
    torch.testing.assert_close(rollout(pipe, "window", 2, None, 1.0, frames=2 * WINDOW + 1, context=0).latents,
                               ref.latents, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------ train / sample / eval, end to end
@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    """`minisora train --attention causal` for 4 steps on 3 + 2 synthetic DMLab clips of 12 frames (16x16)."""
    from typer.testing import CliRunner

    from cli.main import app

    root = tmp_path_factory.mktemp("causal")
    synthetic_store(root, clips=3, test_clips=2)
    r = CliRunner().invoke(app, ["train", "--store", str(root / "store"), "--out", str(root / "run"), "--attention",
                                 "causal", "--frames", "4", "--batch-size", "2", "--steps", "4", "--warmup", "1",
                                 "--ckpt-every", "4", "--use-actions", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root


def test_causal_run_samples_and_evaluates_with_the_cache(causal_run, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    pipe = DiTPipeline.from_run(causal_run / "run")
    assert pipe.transformer.config.attention == "causal" and pipe.kv_cache_mode() == "rolling"
    args = ["sample", "--checkpoint", str(causal_run / "run"), "--context", f"{causal_run / 'store'}:test:0",
            "--context-frames", "2", "--frames", "7", "--steps", "2", "--actions", "context", "--format", "npz"]
    cached = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cached")])
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain"), "--no-kv-cache"])
    exact = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "exact"), "--kv-cache", "window"])
    compiled = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "compiled"), "--compile"])
    assert cached.exit_code == plain.exit_code == exact.exit_code == 0, cached.output + plain.output + exact.output
    assert compiled.exit_code == 0, compiled.output
    assert "rollout: causal attention, KV cache (rolling)" in cached.output and "compiled" not in cached.output
    assert "rollout: causal attention, KV cache (rolling), compiled once full" in compiled.output
    assert "rollout: causal attention, window recompute at every Euler step" in plain.output
    latents = {k: np.load(tmp_path / f"{k}.npz")["latents"] for k in ("cached", "plain", "exact", "compiled")}
    np.testing.assert_allclose(latents["exact"], latents["plain"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(latents["compiled"], latents["cached"], rtol=0, atol=ATOL)  # tests/test_kv_ring.py
    np.testing.assert_allclose(latents["cached"][:4], latents["plain"][:4], rtol=0, atol=ATOL)  # the first window

    report = tmp_path / "rep.json"
    r = CliRunner().invoke(app, ["eval", "--checkpoint", str(causal_run / "run"), "--store", str(causal_run / "store"),
                                 "--context-frames", "2", "--frames", "7", "--num-clips", "2", "--seeds", "1",
                                 "--steps", "2", "--compile", "--out", str(report)])
    assert r.exit_code == 0, r.output
    assert "rollout: causal attention, KV cache (rolling), compiled once full, window 4, chunk 1" in r.output
    rep = json.loads(report.read_text())
    assert rep["rollout"]["kv_cache"] == "rolling" and rep["rollout"]["compiled"] is True
    curves = {"model": rep["model"]["per_horizon"],
              "repeat": rep["baselines"]["repeat_last_context_frame"]["per_horizon"]}
    for per_index in curves.values():  # quality per generated-frame index: 5 generated frames
        assert len(per_index["psnr"]) == len(per_index["ssim"]) == 5
    assert np.mean(curves["model"]["psnr"]) == pytest.approx(rep["model"]["psnr"]["mean"], abs=1e-9)
    assert np.mean(curves["repeat"]["ssim"]) == pytest.approx(
        rep["baselines"]["repeat_last_context_frame"]["ssim"], abs=1e-9)



def test_sample_shows_noised_context_through_the_window_cache(causal_run, tmp_path):
    """`minisora sample --context-noise` (eval's option, which the Doom demo's recipe samples with) reaches the
    sampler, through the window cache by default, as the recompute would. The run's weights are randomised
    (4 steps from adaLN-Zero barely look at the context) and saved as a pipeline, which sample loads."""
    from typer.testing import CliRunner

    from cli.main import app

    pipe = DiTPipeline.from_run(causal_run / "run")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.normal_(0.0, 0.2)
    pipe.save_pretrained(tmp_path / "pipe")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no diffusers deprecation (torch_dtype) on the way in
        assert DiTPipeline.from_run(tmp_path / "pipe").transformer.dtype == torch.float32
    args = ["sample", "--checkpoint", str(tmp_path / "pipe"), "--context", f"{causal_run / 'store'}:test:0",
            "--context-frames", "2", "--frames", "7", "--steps", "2", "--actions", "context", "--format", "npz",
            "--precision", "fp32"]  # the tolerance is float32's
    runs = {"noised": ["--context-noise", "0.2"], "recompute": ["--context-noise", "0.2", "--no-kv-cache"],
            "clean": []}
    for name, extra in runs.items():
        r = CliRunner().invoke(app, [*args, *extra, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        if name == "noised":
            assert "rollout: causal attention, KV cache (window)" in r.output
    latents = {k: np.load(tmp_path / f"{k}.npz")["latents"] for k in runs}
    np.testing.assert_allclose(latents["noised"], latents["recompute"], rtol=0, atol=ATOL)
    assert np.abs(latents["noised"][2:] - latents["clean"][2:]).max() > 1e-3
    r = CliRunner().invoke(app, [*args, "--context-noise", "0.2", "--kv-cache", "rolling", "--out",
                                 str(tmp_path / "x")])
    assert r.exit_code != 0 and "use kv_cache='window'" in r.output

# ------------------------------------------------------------------------------ teacher forcing
@pytest.mark.parametrize("with_actions", [False, True])
def test_teacher_forcing_pass_equals_a_chunk_1_recompute_for_every_frame(with_actions):
    """One pass over (clean copy, noisy copy) gives, for noisy frame i, the velocity of the plain causal pass
    over clean frames < i and noisy frame i, the pass a chunk-1 rollout makes."""
    model = random_dit(depth=3, num_actions=3)
    g = torch.Generator().manual_seed(0)
    clean, noisy = torch.randn(2, 5, 4, 4, 4, generator=g), torch.randn(2, 5, 4, 4, 4, generator=g)
    t = torch.rand(2, 5, generator=g)
    actions = torch.randint(0, 3, (2, 5), generator=g) if with_actions else None
    with torch.no_grad():
        v = model(noisy, t, actions, clean=clean)
        assert v.shape == noisy.shape
        for i in range(5):
            window = torch.cat([clean[:, :i], noisy[:, i:i + 1]], 1)  # (B, i + 1, C, H, W)
            times = torch.cat([torch.zeros(2, i), t[:, i:i + 1]], 1)
            ref = model(window, times, None if actions is None else actions[:, :i + 1])[:, -1]
            torch.testing.assert_close(v[:, i], ref, atol=ATOL, rtol=0)
        # the clean copy's times matter: at t = 0.5 the noisy frames see other keys
        assert not torch.allclose(v, model(noisy, t, actions, clean=clean, clean_timesteps=torch.full((2, 5), 0.5)))


def test_context_only_frames_need_no_noisy_copy():
    """Retrieved memory is context only: a teacher-forcing pass over the clean copy of [memory | window] and the
    noisy window alone gives each window frame the velocity the pass with a noisy copy of every frame gives it."""
    model = random_dit(depth=3, num_actions=3)
    g = torch.Generator().manual_seed(1)
    clean, noisy = torch.randn(2, 6, 4, 4, 4, generator=g), torch.randn(2, 6, 4, 4, 4, generator=g)
    t, t_clean = torch.rand(2, 6, generator=g), 0.1 * torch.rand(2, 6, generator=g)
    actions = torch.randint(0, 3, (2, 6), generator=g)
    with torch.no_grad():
        every = model(noisy, t, actions, clean=clean, clean_timesteps=t_clean)
        for memory in (1, 4):
            v = model(noisy[:, memory:], t[:, memory:], actions, clean=clean, clean_timesteps=t_clean)
            assert v.shape == (2, 6 - memory, 4, 4, 4)
            torch.testing.assert_close(v, every[:, memory:], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"actions \(2, 4\) must be \(B, T\) of the clean copy \(2, 6\)"):
        model(noisy[:, 2:], t[:, 2:], actions[:, 2:], clean=clean)
    long_short = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, attention="causal", short_frames=2)
    with pytest.raises(ValueError, match="2 context-only frames need .* no long-short attention"):
        long_short(noisy[:, 2:], t[:, 2:], clean=clean)


def test_teacher_forcing_needs_a_causal_model_and_matching_shapes():
    full, causal = random_dit(attention="full"), random_dit()
    x = torch.randn(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=r"teacher forcing \(clean=...\) needs a causal model; .* attention='full'"):
        full(x, torch.rand(1, 3), clean=x)
    with pytest.raises(ValueError, match=r"clean \(1, 2, 4, 4, 4\) must match latents \(1, 3, 4, 4, 4\)"):
        causal(x, torch.rand(1, 3), clean=x[:, :2])
