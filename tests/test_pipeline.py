"""DiTPipeline on tiny random models: save/load, Euler steps and shift, continuation, rollouts, action guidance."""

import io

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.vae import build_vae, tiny_vae_config

LATENT = (4, 4, 4)  # (C, h, w): the tiny VAE maps 16x16 frames to 4x4 latents with 4 channels


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae("kl", tiny_vae_config("kl"))  # 4x downsampling, 4 latent channels


def make_pipe(vae, num_actions=3, window=8, shift=1.0, seed=0, **config) -> DiTPipeline:
    """A pipeline around a 1-block DiT whose weights are all random (a fresh adaLN-Zero DiT predicts v = 0)."""
    torch.manual_seed(seed)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, num_actions=num_actions)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    pipe = DiTPipeline(dit, vae.model, FlowMatchEulerDiscreteScheduler(shift=shift), window_frames=window,
                       latent_size=[4, 4], **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ save / load
def test_save_pretrained_from_pretrained_round_trip_gives_identical_samples(vae, tmp_path):
    config = dict(latents_mean=[0.5, -0.25, 0.0, 1.0], latents_std=[2.0, 0.5, 1.0, 1.5], fps=7.5, frame_stride=2,
                  resolution=[16, 16])
    pipe = make_pipe(vae, window=4, shift=2.0, **config)
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model_index.json", "transformer", "vae", "scheduler"}
    loaded = DiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for key, value in {**config, "window_frames": 4, "latent_size": [4, 4]}.items():
        assert loaded.config[key] == value, key
    assert loaded.scheduler.config.shift == 2.0
    assert loaded.transformer.config.num_actions == 3 and type(loaded.vae).__name__ == "AutoencoderKL"

    acts = torch.tensor([[0, 1, 2, 0, 1, 2]])
    a = pipe(num_frames=6, num_inference_steps=3, actions=acts, guidance=2.0, generator=gen(0))
    b = loaded(num_frames=6, num_inference_steps=3, actions=acts, guidance=2.0, generator=gen(0))
    assert a.frames.shape == (1, 6, 16, 16, 3) and a.frames.dtype == np.uint8
    assert a.latents.shape == (1, 6, *LATENT) and a.latents.dtype == torch.float32
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    c = loaded(num_frames=6, num_inference_steps=3, actions=acts, guidance=2.0, generator=gen(1))
    assert not torch.equal(a.latents, c.latents)  # another seed, another video


def test_latent_statistics_denormalise_before_decoding(vae):
    plain = make_pipe(vae)
    scaled = make_pipe(vae, latents_mean=[0.5, -0.25, 0.0, 1.0], latents_std=[2.0, 0.5, 1.0, 1.5])
    z = torch.randn(1, 2, *LATENT, generator=gen(3))
    mu = torch.tensor([0.5, -0.25, 0.0, 1.0]).view(1, 1, 4, 1, 1)
    sd = torch.tensor([2.0, 0.5, 1.0, 1.5]).view(1, 1, 4, 1, 1)
    torch.testing.assert_close(scaled.decode_latents(z), plain.decode_latents(z * sd + mu))
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8)
    torch.testing.assert_close(scaled.encode_frames(frames), (plain.encode_frames(frames) - mu) / sd)


# ------------------------------------------------------------------------------ the call
def test_call_takes_diffusers_names_and_checks_height_and_width(vae):
    pipe = make_pipe(vae)  # 4x VAE, 2x2 patches: frames in multiples of 8 pixels; trained on 16x16
    out = pipe(batch_size=2, num_inference_steps=2, height=16, width=16, num_frames=8, generator=gen(0),
               output_type="latent")
    default = pipe(batch_size=2, num_inference_steps=2, num_frames=8, generator=gen(0), output_type="latent")
    assert out.latents.shape == (2, 8, *LATENT) and torch.equal(out.latents, default.latents)
    wide = pipe(height=16, width=32, num_frames=8, num_inference_steps=1, generator=gen(0))
    assert wide.frames.shape == (1, 8, 16, 32, 3)
    with pytest.raises(ValueError, match="height 18 must be a positive multiple of 8: the VAE compresses 4x and "
                                         "the transformer's patches are 2x2 latent pixels"):
        pipe(height=18, num_frames=8)
    with pytest.raises(ValueError, match="height x width 32x32 does not fit the context: its latents are 4x4, "
                                         "frames of 16x16 pixels"):
        pipe(context_latents=torch.zeros(1, 2, *LATENT), height=32, width=32, num_frames=8)
    with pytest.raises(TypeError):
        pipe(num_videos=1, steps=2)  # the names before diffusers' are gone


# ------------------------------------------------------------------------------ Euler steps, shift, guidance
def test_one_euler_step_with_action_guidance_is_exact(vae):
    pipe = make_pipe(vae)
    acts = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])
    out = pipe(num_frames=8, num_inference_steps=1, actions=acts, guidance=3.0, generator=gen(0), output_type="latent")
    noise = torch.randn(1, 8, *LATENT, generator=gen(0))
    t = torch.ones(1, 8)
    with torch.no_grad():
        cond = pipe.transformer(noise, t, acts)
        uncond = pipe.transformer(noise, t, torch.full_like(acts, -1))
    # one step from t = 1 to t = 0: x0 = x1 - v, with v = uncond + 3 (cond - uncond)
    torch.testing.assert_close(out.latents, noise - (uncond + 3.0 * (cond - uncond)))


def test_steps_and_shift_follow_the_shifted_time_grid(vae):
    pipe = make_pipe(vae, shift=3.0)
    out = pipe(num_frames=8, num_inference_steps=2, generator=gen(0), output_type="latent")  # shift from the scheduler
    model = pipe.transformer
    x = torch.randn(1, 8, *LATENT, generator=gen(0))
    t_mid = 3.0 * 0.5 / (1 + 2.0 * 0.5)  # the uniform midpoint 0.5, shifted by 3: 0.75
    with torch.no_grad():
        x = x + (t_mid - 1.0) * model(x, torch.ones(1, 8))
        x = x + (0.0 - t_mid) * model(x, torch.full((1, 8), t_mid))
    torch.testing.assert_close(out.latents, x)
    explicit = pipe(num_frames=8, num_inference_steps=2, shift=3.0, generator=gen(0), output_type="latent")
    unshifted = pipe(num_frames=8, num_inference_steps=2, shift=1.0, generator=gen(0), output_type="latent")
    assert torch.equal(explicit.latents, out.latents) and not torch.allclose(unshifted.latents, out.latents)


def test_action_guidance_changes_the_output(vae):
    pipe = make_pipe(vae)
    assert pipe.transformer.action_embed.weight.abs().min() > 0  # every action (and the null one) embeds non-zero
    acts = torch.tensor([[2, 2, 1, 1, 0, 0, 2, 1]])
    run = lambda **kw: pipe(num_frames=8, num_inference_steps=3, generator=gen(0), output_type="latent", **kw).latents  # noqa: E731
    g1, g3 = run(actions=acts, guidance=1.0), run(actions=acts, guidance=3.0)
    none = run()
    assert (g1 - g3).abs().max() > 1e-3 and (g1 - none).abs().max() > 1e-3
    assert torch.equal(run(guidance=3.0), none)  # without actions there is nothing to guide
    assert torch.equal(run(actions=acts, guidance=3.0), g3)


def test_action_errors_name_the_numbers(vae):
    pipe = make_pipe(vae)
    with pytest.raises(ValueError, match=r"must be integers shaped \(videos, latent frames\) = \(1, 8\)"):
        pipe(num_frames=8, num_inference_steps=1, actions=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"actions must be in \[0, 3\) \(or -1 for none\); got values 0\.\.3"):
        pipe(num_frames=8, num_inference_steps=1, actions=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="trained without actions"):
        make_pipe(vae, num_actions=0)(num_frames=8, num_inference_steps=1, actions=torch.zeros(1, 8, dtype=torch.long))


# ------------------------------------------------------------------------------ continuation
def test_continuation_keeps_context_latents_exactly(vae):
    pipe = make_pipe(vae)
    ctx = torch.randn(2, 3, *LATENT, generator=gen(5))
    out = pipe(context_latents=ctx, num_frames=8, num_inference_steps=2, generator=gen(0), output_type="float")
    assert out.context_frames == 3 and out.latents.shape == (2, 8, *LATENT)
    assert torch.equal(out.latents[:, :3], ctx)
    assert (out.latents[:, 3:] - ctx[:, -1:]).abs().amin(dim=(2, 3, 4)).max() > 0  # the rest is generated
    assert out.frames.shape == (2, 8, 3, 16, 16) and out.frames.min() >= -1 and out.frames.max() <= 1
    torch.testing.assert_close(out.frames[:, :3], pipe.decode_latents(ctx))  # context decodes as given

    with pytest.raises(ValueError, match="num_frames 3 must exceed the 3 context latent frames"):
        pipe(context_latents=ctx, num_frames=3, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"context latents must be \(B, K, 4, h, w\), got \(2, 3, 3, 4, 4\)"):
        pipe(context_latents=ctx[:, :, :3], num_frames=8, num_inference_steps=1)


def test_continuation_from_pixels_encodes_them_with_the_pipeline_vae(vae):
    pipe = make_pipe(vae, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    frames = np.random.default_rng(1).integers(0, 256, (1, 3, 16, 16, 3), dtype=np.uint8)
    out = pipe(context_frames=frames, num_frames=5, num_inference_steps=2, generator=gen(0))
    assert torch.equal(out.latents[:, :3], pipe.encode_frames(frames))
    assert out.frames.shape == (1, 5, 16, 16, 3) and out.context_frames == 3


def test_bf16_transformer_keeps_float32_latents_and_exact_context(vae):
    """The CUDA path (transformer in bf16, VAE and Euler in float32), run on CPU."""
    pipe = make_pipe(vae)
    ctx = torch.randn(1, 2, *LATENT, generator=gen(5))
    ref = pipe(context_latents=ctx, num_frames=6, num_inference_steps=2, generator=gen(0), output_type="latent").latents
    pipe.transformer.to(torch.bfloat16)
    out = pipe(context_latents=ctx, num_frames=6, num_inference_steps=2, generator=gen(0))
    assert out.latents.dtype == torch.float32 and torch.equal(out.latents[:, :2], ctx)
    assert out.frames.dtype == np.uint8 and out.frames.shape == (1, 6, 16, 16, 3)
    err = (out.latents - ref).abs().max().item()
    assert 0 < err < 0.1 * ref.abs().max().item()  # bf16 rounding, not a different computation


# ------------------------------------------------------------------------------ long rollouts
def test_rollout_plan_windows(vae):
    pipe = make_pipe(vae, window=8)
    assert pipe.rollout_plan(8, 0, 4) == [(0, 8, 0)]  # no context: the first window is a whole one
    assert pipe.rollout_plan(12, 0, 4) == [(0, 8, 0), (4, 8, 8)]
    assert pipe.rollout_plan(10, 0, 4) == [(0, 8, 0), (2, 8, 8)]  # 2 new frames left: 6 known ones fit before them
    assert pipe.rollout_plan(20, 4, 4) == [(0, 8, 4), (4, 8, 8), (8, 8, 12), (12, 8, 16)]
    # with context every window generates `chunk` frames after as many known ones as fit (window - chunk),
    # so the first windows may be shorter than the training window
    assert pipe.rollout_plan(16, 4, 2) == [(0, 6, 4), (0, 8, 6), (2, 8, 8), (4, 8, 10), (6, 8, 12), (8, 8, 14)]
    assert pipe.rollout_plan(14, 10, 2) == [(4, 8, 10), (6, 8, 12)]
    assert pipe.rollout_plan(13, 1, 6) == [(0, 7, 1), (5, 8, 7)]
    assert pipe.rollout_plan(12, 11, 7) == [(4, 8, 11)]  # 1 frame left: 7 known ones before it

    plan = pipe.rollout_plan(300, 0, 4)
    assert len(plan) == 74 and plan[0] == (0, 8, 0) and plan[-1] == (292, 8, 296)
    # a causal model starts without context frame by frame too (its frame 0 sees nothing before it)
    pipe.transformer.register_to_config(attention="causal")
    assert pipe.rollout_plan(4, 0, 1) == [(0, 1, 0), (0, 2, 1), (0, 3, 2), (0, 4, 3)]
    assert pipe.rollout_plan(10, 0, 4) == [(0, 4, 0), (0, 8, 4), (2, 8, 8)]
    assert pipe.rollout_plan(20, 4, 4) == [(0, 8, 4), (4, 8, 8), (8, 8, 12), (12, 8, 16)]  # with context: unchanged
    pipe.transformer.register_to_config(attention="full")
    assert all(n == 8 for _, n, _ in plan)
    for (s0, n0, _), (s1, _, k1) in zip(plan, plan[1:]):
        assert k1 == s0 + n0 and k1 - s1 == 4  # next window: the last 4 frames before it as context

    for total, given, chunk, msg in ((8, 8, 4, "num_frames 8 must exceed the 8 context"),
                                     (12, 0, 8, r"chunk 8 must be in \[1, 7\]"),
                                     (12, 0, 0, r"chunk 0 must be in \[1, 7\]")):
        with pytest.raises(ValueError, match=msg):
            pipe.rollout_plan(total, given, chunk)


def test_300_frame_rollout_conditions_every_window_on_the_previous_one(vae):
    pipe = make_pipe(vae, window=8)
    calls = []  # (x_t, t) of every transformer call
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: calls.append((args[0].clone(), args[1].clone())))
    try:
        out = pipe(num_frames=300, num_inference_steps=2, generator=gen(0))
    finally:
        hook.remove()
    assert out.frames.shape == (1, 300, 16, 16, 3) and out.latents.shape == (1, 300, *LATENT)
    assert torch.isfinite(out.latents).all()
    plan = pipe.rollout_plan(300, 0, 1)  # the default chunk: one new frame per window after the first
    assert len(plan) == 1 + (300 - 8) and all(n == 8 for _, n, _ in plan)
    assert len(calls) == 2 * len(plan)
    for w, (start, n, known) in enumerate(plan):
        ctx = known - start
        for step, t_step in enumerate((1.0, 0.5)):
            x, t = calls[2 * w + step]
            assert x.shape == (1, n, *LATENT)
            # the context of window w is exactly what earlier windows generated for those frames
            assert torch.equal(x[:, :ctx], out.latents[:, start:known])
            assert (t[:, :ctx] == 0).all() and (t[:, ctx:] == t_step).all()
    windows = [out.latents[0, k:s + n] for s, n, k in plan]
    assert sum(len(x) for x in windows) == 300  # each frame generated exactly once


def test_rollout_after_context_and_custom_chunk(vae):
    pipe = make_pipe(vae, window=4)
    ctx = torch.randn(1, 3, *LATENT, generator=gen(2))
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].clone()))
    try:
        out = pipe(context_latents=ctx, num_frames=11, chunk=3, num_inference_steps=1, generator=gen(0),
                   output_type="latent")
    finally:
        hook.remove()
    plan = pipe.rollout_plan(11, 3, 3)
    assert plan == [(2, 4, 3), (5, 4, 6), (7, 4, 9)]
    assert torch.equal(out.latents[:, :3], ctx) and len(calls) == 3
    for x, (start, _, known) in zip(calls, plan):
        assert torch.equal(x[:, : known - start], out.latents[:, start:known])


def test_progress_bar_ticks_once_per_step_of_every_window(vae):
    pipe = make_pipe(vae, window=4)
    log = io.StringIO()
    pipe.set_progress_bar_config(file=log, disable=False)
    pipe(num_frames=8, num_inference_steps=3, generator=gen(0), output_type="latent")  # windows (0,4,0), (1,4,4), ...
    text = log.getvalue()
    assert "window 5/5" in text and "15/15" in text
