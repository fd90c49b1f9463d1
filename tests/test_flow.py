"""Analytic checks of the flow-matching objective and the Euler sampler (minisora.flow)."""

import pytest
import torch

from minisora.flow import (FlowConfig, euler_sample, flow_loss, logit_normal, noisy, sample_times,
                          teacher_forcing_times, time_grid)

SHAPE = (2, 5, 3, 4, 4)  # (B, T, C, H, W)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_noisy_endpoints_and_midpoint():
    x0, e = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    t = torch.tensor([[0.0, 1.0, 0.25, 0.5, 0.0], [1.0, 0.0, 0.75, 0.1, 1.0]])
    xt = noisy(x0, e, t)
    assert torch.equal(xt[0, 0], x0[0, 0]) and torch.equal(xt[1, 1], x0[1, 1])  # t=0: data, bit-exact
    assert torch.equal(xt[0, 1], e[0, 1]) and torch.equal(xt[1, 0], e[1, 0])  # t=1: noise
    torch.testing.assert_close(xt[0, 2], 0.75 * x0[0, 2] + 0.25 * e[0, 2])
    torch.testing.assert_close(xt[1, 3], 0.9 * x0[1, 3] + 0.1 * e[1, 3])
    with pytest.raises(ValueError, match=r"t \(2, 4\)"):
        noisy(x0, e, t[:, :4])


def test_loss_zero_for_true_velocity_and_known_value():
    x0, e = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    assert flow_loss(e - x0, x0, e).item() == 0.0
    # an error of 2 everywhere gives 4; on one frame of ten gives 4/10
    assert flow_loss(e - x0 + 2.0, x0, e).item() == pytest.approx(4.0)
    v = (e - x0).clone()
    v[1, 3] += 2.0
    assert flow_loss(v, x0, e).item() == pytest.approx(0.4)


def test_loss_ignores_context_frames_and_weighs_frames_equally():
    x0, e = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    context = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    v = _randn(*SHAPE, seed=3)
    base = flow_loss(v, x0, e, context)
    v2 = v.clone()
    v2[context] = float("nan")  # whatever the model says on context frames
    assert torch.equal(flow_loss(v2, x0, e, context), base)
    # equals the mean of the per-frame MSEs over the 7 non-context frames
    per_frame = (v - (e - x0)).square().mean(dim=(2, 3, 4))
    torch.testing.assert_close(base, per_frame[~context].mean())
    # changing a non-context frame does change it
    v3 = v.clone()
    v3[1, 1] += 1.0
    assert flow_loss(v3, x0, e, context) > base
    assert flow_loss(v, x0, e, torch.ones(2, 5, dtype=torch.bool)).item() == 0.0


def test_logit_normal_range_and_median():
    t = logit_normal((20000,), mean=0.5, std=1.0, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.01)


def _modes(t, context):
    """Classify each sample: 'prefix' if it has context, 'full' if its frames share one t, else 'independent'."""
    out = []
    for ti, ci in zip(t, context):
        if ci.any():
            out.append("prefix")
        elif (ti == ti[0]).all():
            out.append("full")
        else:
            out.append("independent")
    return out


def test_mode_probabilities_respected():
    cfg = FlowConfig(p_full=0.5, p_prefix=0.3, p_independent=0.2)
    n = 4000
    t, context = sample_times(n, 6, cfg, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n, 6) and context.shape == (n, 6) and context.dtype == torch.bool
    modes = _modes(t, context)
    # binomial standard deviation at n=4000 is <= 0.008; allow 4 sigma
    assert modes.count("full") / n == pytest.approx(0.5, abs=0.032)
    assert modes.count("prefix") / n == pytest.approx(0.3, abs=0.032)
    assert modes.count("independent") / n == pytest.approx(0.2, abs=0.032)


def test_context_is_a_prefix_with_t_zero():
    cfg = FlowConfig(p_full=0.0, p_prefix=1.0, p_independent=0.0)
    frames = 6
    t, context = sample_times(3000, frames, cfg, generator=torch.Generator().manual_seed(1))
    k = context.sum(dim=1)
    assert k.min() == 1 and k.max() == frames - 1  # k in [1, T-1], both ends reached
    assert torch.equal(context, torch.arange(frames)[None] < k[:, None])  # a prefix
    assert (t[context] == 0).all() and (t[~context] > 0).all()
    # the last frame is never context; the other non-context frames share its t
    assert torch.equal(t[:, -1:].expand_as(t)[~context], t[~context])
    # the cap on k, and T == 1 has no room for context
    capped_cfg = FlowConfig(0.0, 1.0, 0.0, max_context=2)
    _, capped = sample_times(500, frames, capped_cfg, generator=torch.Generator().manual_seed(2))
    assert capped.sum(dim=1).max() == 2
    t1, c1 = sample_times(50, 1, cfg, generator=torch.Generator().manual_seed(3))
    assert not c1.any() and (t1 > 0).all()


def test_flow_config_validates():
    with pytest.raises(ValueError, match="sum to 1"):
        FlowConfig(p_full=0.5, p_prefix=0.5, p_independent=0.5)
    with pytest.raises(ValueError, match="max_context"):
        FlowConfig(max_context=0)


def test_time_grid_endpoints_monotone_and_shift():
    for shift in (1.0, 0.5, 3.0):
        g = time_grid(10, shift)
        assert g.shape == (11,) and g[0].item() == 1.0 and g[-1].item() == 0.0
        assert (g[1:] < g[:-1]).all()
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift 3 moves t=0.5 to 1.5 / 2 = 0.75: more steps at high noise, larger steps near t=0
    torch.testing.assert_close(time_grid(2, 3.0), torch.tensor([1.0, 0.75, 0.0]))
    g = time_grid(20, 3.0)
    assert (g > 0.5).sum() > (time_grid(20) > 0.5).sum()
    dt = g[:-1] - g[1:]
    assert (dt[1:] > dt[:-1]).all()  # step sizes grow towards t = 0


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 1.0), (13, 3.0), (5, 0.4)])
def test_constant_velocity_integrates_exactly(steps, shift):
    e, c = _randn(*SHAPE, seed=4), _randn(*SHAPE, seed=5)
    x = euler_sample(lambda x_t, t: c, e, steps, shift)
    torch.testing.assert_close(x, e - c, atol=1e-6, rtol=0)  # x(0) = x(1) - integral_0^1 c dt


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 1.0), (25, 3.0)])
def test_optimal_velocity_for_one_data_point_reaches_it(steps, shift):
    # If the data is a single point x*, then x_t = (1 - t) x* + t e, so e = (x_t - (1 - t) x*) / t and
    # the exact velocity is v(x_t, t) = e - x* = (x_t - x*) / t. It is constant along each straight
    # path, so Euler lands on x* with any grid.
    x_star, e = _randn(*SHAPE, seed=6), _randn(*SHAPE, seed=7)
    calls = []

    def velocity(x_t, t):
        calls.append(t.clone())
        return (x_t - x_star) / t[:, :, None, None, None]

    x = euler_sample(velocity, e, steps, shift)
    torch.testing.assert_close(x, x_star, atol=1e-5, rtol=0)
    assert len(calls) == steps and calls[0].eq(1.0).all() and (torch.stack(calls) > 0).all()


def test_euler_keeps_context_frames_bit_exact_at_t_zero():
    e, ctx = _randn(*SHAPE, seed=8), _randn(*SHAPE, seed=9)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, False, False]])
    seen = []

    def velocity(x_t, t):
        seen.append((x_t.clone(), t.clone()))
        return torch.full_like(x_t, 3.0)  # would move context frames if they were integrated

    x = euler_sample(velocity, e, 6, 2.0, context=ctx, context_mask=mask)
    assert torch.equal(x[mask], ctx[mask])
    torch.testing.assert_close(x[~mask], e[~mask] - 3.0, atol=1e-6, rtol=0)
    for x_t, t in seen:  # every step sees clean context frames with t = 0, and t > 0 elsewhere
        assert torch.equal(x_t[mask], ctx[mask]) and (t[mask] == 0).all() and (t[~mask] > 0).all()
    with pytest.raises(ValueError, match="both context and context_mask"):
        euler_sample(velocity, e, 2, context=ctx)


# --- context noise (GameNGen / Diffusion Forcing): noisy context at training and at sampling -----


def test_context_noise_draws_context_times_below_the_cap_and_leaves_the_rest_alone():
    base = FlowConfig(p_full=0.0, p_prefix=1.0, p_independent=0.0)
    noisy_cfg = FlowConfig(p_full=0.0, p_prefix=1.0, p_independent=0.0, context_noise=0.2)
    t0, c0 = sample_times(256, 6, base, generator=torch.Generator().manual_seed(3))
    t1, c1 = sample_times(256, 6, noisy_cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c0, c1) and c0.any()  # the same prefixes
    assert torch.equal(t0[~c0], t1[~c1])  # the same times on the frames that are learnt
    assert (t0[c0] == 0).all()
    ctx = t1[c1]
    assert (ctx >= 0).all() and (ctx < 0.2).all() and ctx.std() > 0.03  # U(0, 0.2): spread over the range
    assert abs(ctx.mean().item() - 0.1) < 0.01
    with pytest.raises(ValueError, match="context_noise must be in \\[0, 1\\), got 1.0"):
        FlowConfig(context_noise=1.0)


def test_euler_holds_context_at_its_noise_level_with_that_time():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 2, 2, generator=g)
    noise = torch.randn(2, 4, 3, 2, 2, generator=g)
    mask = torch.tensor([[True, True, False, False]] * 2)
    c = torch.full_like(x0, 0.5)
    seen = []

    def velocity(x, t):
        seen.append((x.clone(), t.clone()))
        return c

    out = euler_sample(velocity, noise, steps=3, context=x0, context_mask=mask, context_t=0.1)
    held = 0.9 * x0 + 0.1 * noise  # noisy(x0, noise, 0.1)
    for x, t in seen:  # every model call sees the context at t = 0.1, with its noise from `noise`
        assert torch.allclose(t[mask], torch.full((4,), 0.1)) and (t[~mask] > 0).all()
        assert torch.allclose(x[:, :2], held[:, :2])
    assert torch.allclose(out[:, :2], held[:, :2])
    assert torch.allclose(out[:, 2:], noise[:, 2:] - c[:, 2:], atol=1e-6)  # a constant velocity integrates exactly
    clean = euler_sample(velocity, noise, steps=3, context=x0, context_mask=mask)
    assert torch.equal(clean[:, :2], x0[:, :2])  # the default keeps clean context at t = 0
    with pytest.raises(ValueError, match="context_t must be in \\[0, 1\\), got -0.1"):
        euler_sample(velocity, noise, steps=3, context=x0, context_mask=mask, context_t=-0.1)


def test_train_and_eval_expose_the_context_noise_options():
    from typer.testing import CliRunner

    from cli.main import app

    train_help = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    eval_help = CliRunner().invoke(app, ["eval", "--help"], terminal_width=200).output
    assert "--context-noise" in train_help and "--logit-mean" in train_help and "--context-noise" in eval_help
    assert "--teacher-forcing" in train_help


def test_teacher_forcing_times_are_per_frame_and_the_clean_copy_follows_context_noise():
    t, t_clean = teacher_forcing_times(512, 6, FlowConfig(), generator=torch.Generator().manual_seed(0))
    assert t.shape == t_clean.shape == (512, 6) and (t_clean == 0).all()
    assert ((t > 0) & (t < 1)).all() and abs(t.mean().item() - 0.5) < 0.02  # logit-normal(0, 1) around 1/2
    assert (t[:, 1:] != t[:, :1]).all()  # every frame its own time
    low, _ = teacher_forcing_times(512, 6, FlowConfig(logit_mean=-1.0), generator=torch.Generator().manual_seed(0))
    assert low.mean() < t.mean() - 0.1
    _, noisy_clean = teacher_forcing_times(512, 6, FlowConfig(context_noise=0.2),
                                           generator=torch.Generator().manual_seed(0))
    assert (noisy_clean >= 0).all() and (noisy_clean < 0.2).all() and abs(noisy_clean.mean().item() - 0.1) < 0.01
    with pytest.raises(ValueError, match="teacher_forcing must be in \\[0, 1\\], got 1.5"):
        FlowConfig(teacher_forcing=1.5)


def test_teacher_forcing_steps_are_a_fixed_share_the_same_on_every_rank():
    from stages.train import TrainConfig, is_teacher_forcing_step

    def steps(p, seed=0):
        cfg = TrainConfig(store="s", out="o", attention="causal", seed=seed, flow=FlowConfig(teacher_forcing=p))
        return [is_teacher_forcing_step(cfg, step) for step in range(2000)]

    assert not any(steps(0.0)) and all(steps(1.0))
    half = steps(0.5)
    assert half == steps(0.5) and half != steps(0.5, seed=1)  # a function of (seed, step) only
    assert abs(sum(half) / len(half) - 0.5) < 0.05


def test_heun_is_exact_on_a_linear_field_where_euler_is_not_and_counts_its_calls():
    """dx/dt = x has x(0) = x(1) / e; Heun's error at n steps is far below Euler's at 2n - 1 (equal model calls)."""
    from minisora.flow import heun_sample

    noise = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    calls = []

    def velocity(x, t):
        calls.append(1)
        return x

    exact = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    heun = heun_sample(velocity, noise, steps=4)
    assert len(calls) == 2 * 4 - 1
    euler = euler_sample(velocity, noise, steps=7)
    assert abs(heun[0, 1].item() - exact) < 0.5 * abs(euler[0, 1].item() - exact)
    const = heun_sample(lambda x, t: torch.full_like(x, 0.25), noise, steps=3)
    assert torch.allclose(const, noise - 0.25)  # a constant velocity integrates exactly
    mask = torch.tensor([[True, False]])
    ctx = torch.full_like(noise, 3.0)
    held = heun_sample(velocity, noise, steps=3, context=ctx, context_mask=mask)
    assert held[0, 0].item() == 3.0
