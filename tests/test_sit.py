"""SiT's interpolants, predictions and SDE sampler (minisora.interpolants, minisora.sde), checked analytically.

The ideal model: for Gaussian data x0 ~ N(m, c^2) per element (c = 0: the single data point m), x_t = a x0 + s e
is Gaussian too, and every prediction has a closed form (`ideal`). Tolerances: conversions are exact algebra
(float64, 1e-9); a sampler that must land on the data point does so to float32 rounding (1e-5) where the path is
straight, else to its discretisation error at the stated steps; Gaussian samples of 32768 elements match m and c to
0.02 (the mean's standard error is 0.004).
"""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from minisora.configs import PATHS, PREDICTIONS, SDE_DIFFUSIONS, SDE_LAST_STEPS, SDEConfig
from minisora.flow import euler_sample, flow_loss, heun_sample, noisy, time_grid
from minisora.interpolants import (coefficients, convert, data_and_noise, drift_variance, interpolate, sample_start,
                                   target)
from minisora.sde import diffusion_coefficient, sde_sample

SHAPE = (64, 2, 4, 8, 8)  # (B, T, C, H, W): 32768 elements


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ideal(path, prediction, m, c=0.0):
    """The exact `prediction` of a model of data N(m, c^2) at (x_t, t)."""
    def fn(x, t):
        k = coefficients(path, t, x.dtype)
        var = k.a ** 2 * c ** 2 + k.s ** 2  # Var x_t
        d = x - k.a * m
        if prediction == "score":
            return -d / var
        e, x0 = k.s / var * d, m + k.a * c ** 2 / var * d  # E[e | x_t], E[x0 | x_t]
        return {"noise": e, "data": x0}.get(prediction, k.da * x0 + k.ds * e)
    return fn


def ideal_velocity(path, prediction, m, c=0.0):
    """What the pipeline does: the ideal `prediction`, converted to a velocity."""
    f = ideal(path, prediction, m, c)
    return lambda x, t: convert(f(x, t), x, t, path, prediction, "velocity")


# ------------------------------------------------------------------------------ the paths
def test_paths_match_their_closed_forms_and_velocities_their_derivatives():
    t = torch.tensor([[0.0, 0.25, 0.5, 0.9, 1.0]], dtype=torch.float64)
    lin, gvp, vp = (coefficients(p, t, torch.float64) for p in PATHS)
    torch.testing.assert_close(lin.a.flatten(), 1 - t.flatten())
    torch.testing.assert_close(gvp.a.flatten()[2], torch.tensor(math.sqrt(0.5), dtype=torch.float64))
    torch.testing.assert_close(gvp.s.flatten()[2], torch.tensor(math.sqrt(0.5), dtype=torch.float64))
    assert vp.a.flatten()[-1].item() == pytest.approx(math.exp(-19.9 / 4 - 0.05))  # exp(-(b1-b0)/4 - b0/2)
    assert vp.a.flatten()[2].item() == pytest.approx(math.exp(-0.25 * 19.9 / 4 - 0.025))
    for k in (gvp, vp):  # variance preserving
        torch.testing.assert_close(k.a ** 2 + k.s ** 2, torch.ones_like(k.a))
    x0, e = _randn(1, 5, 2, 3, 3, seed=1, dtype=torch.float64), _randn(1, 5, 2, 3, 3, seed=2, dtype=torch.float64)
    for path in PATHS:
        xt = interpolate(path, x0, e, t)
        assert torch.equal(xt[:, 0], x0[:, 0])  # t = 0: the data, bit for bit
        if path != "vp":
            torch.testing.assert_close(xt[:, -1], e[:, -1])  # t = 1: the noise
        tm = t[:, 1:4]  # the velocity is d x_t / dt: a central difference in float64
        fd = (interpolate(path, x0[:, 1:4], e[:, 1:4], tm + 1e-6) - interpolate(path, x0[:, 1:4], e[:, 1:4], tm - 1e-6))
        torch.testing.assert_close(target("velocity", path, x0[:, 1:4], e[:, 1:4], tm), fd / 2e-6,
                                   atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(noisy(x0.float(), e.float(), t.float()), (1 - t.float())[..., None, None, None]
                               * x0.float() + t.float()[..., None, None, None] * e.float(), atol=0, rtol=0)


def test_drift_variance_is_the_known_diffusion_of_each_path():
    t = torch.tensor([[0.1, 0.5, 0.8]], dtype=torch.float64)
    d = {p: drift_variance(coefficients(p, t, torch.float64)).flatten() for p in PATHS}
    torch.testing.assert_close(d["linear"], (t / (1 - t)).flatten())
    torch.testing.assert_close(d["gvp"], (math.pi / 2 * torch.tan(math.pi * t / 2)).flatten())
    torch.testing.assert_close(d["vp"], (0.5 * (0.1 + t * 19.9)).flatten())  # beta(t) / 2


@pytest.mark.parametrize("path", PATHS)
def test_every_prediction_converts_to_every_other(path):
    x0, e = _randn(2, 3, 2, 4, 4, seed=3, dtype=torch.float64), _randn(2, 3, 2, 4, 4, seed=4, dtype=torch.float64)
    t = torch.tensor([[0.05, 0.5, 0.95], [0.3, 0.7, 0.999]], dtype=torch.float64)
    x = interpolate(path, x0, e, t)
    truth = {p: target(p, path, x0, e, t) for p in PREDICTIONS}
    torch.testing.assert_close(truth["score"], -e / coefficients(path, t, torch.float64).s)
    for source in PREDICTIONS:
        rec_x0, rec_e = data_and_noise(source, path, truth[source], x, t)
        torch.testing.assert_close(rec_x0, x0, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(rec_e, e, atol=1e-9, rtol=1e-9)
        for dest in PREDICTIONS:
            torch.testing.assert_close(convert(truth[source], x, t, path, source, dest), truth[dest],
                                       atol=1e-9, rtol=1e-9)


def test_losses_and_their_weighting():
    x0, e = _randn(2, 3, 2, 4, 4, seed=5), _randn(2, 3, 2, 4, 4, seed=6)
    t = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.4, 0.6]])
    for path in PATHS:
        for prediction in PREDICTIONS:
            right = target(prediction, path, x0, e, t)
            assert flow_loss(right, x0, e, t=t, path=path, prediction=prediction).item() == pytest.approx(0, abs=1e-9)
    s = coefficients("gvp", t).s[:, :, 0, 0, 0]  # (B, T)
    q = target("score", "gvp", x0, e, t)
    # the score's loss is |s q_hat + e|^2 = s^2 |q_hat - q|^2: an error of 1 weighs s^2
    loss = flow_loss(q + 1, x0, e, t=t, path="gvp", prediction="score")
    assert loss.item() == pytest.approx(s.square().mean().item())
    assert flow_loss(e + 1, x0, e, t=t, path="vp", prediction="noise").item() == pytest.approx(1.0)
    # data (x0) on linear: the velocity loss weighted by t^2 (an x0 error d is a velocity error -d / t)
    assert flow_loss(x0 + 1, x0, e, t=t, path="linear", prediction="data").item() == pytest.approx(1.0)
    v_of_x0 = convert(x0 + 1, interpolate("linear", x0, e, t), t, "linear", "data", "velocity")
    weighted = (v_of_x0 - target("velocity", "linear", x0, e, t)).square() * t[:, :, None, None, None].square()
    assert weighted.mean().item() == pytest.approx(1.0, rel=1e-5)
    # at t = 0 (a frame held clean) a data prediction still converts to finite values: e = 0 there
    t0 = torch.zeros(2, 3)
    assert torch.isfinite(convert(x0 + 1, x0, t0, "linear", "data", "velocity")).all()
    assert (data_and_noise("data", "linear", x0 + 1, x0, t0)[1] == 0).all()
    with pytest.raises(ValueError, match="needs the times t"):
        flow_loss(q, x0, e, path="gvp", prediction="score")
    # context frames at t = 0: vp's velocity target is infinite there, yet the loss and its gradient stay finite
    ctx = torch.tensor([[True, False, False], [True, True, False]])
    out = torch.zeros_like(x0, requires_grad=True)
    loss = flow_loss(out, x0, e, ctx, torch.where(ctx, 0.0, t), path="vp")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.grad).all() and (out.grad[ctx] == 0).all()


# ------------------------------------------------------------------------------ samplers with an ideal model
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_on_the_linear_path_lands_on_the_data_point_from_any_prediction(prediction):
    x_star, e = _randn(*SHAPE, seed=7), _randn(*SHAPE, seed=8)
    start = sample_start("linear", prediction)
    assert start == (1.0 if prediction in ("velocity", "data") else 0.999)  # x0 and e both known at t = 1
    x = euler_sample(ideal_velocity("linear", prediction, x_star), e, 4, path="linear", start=start)
    torch.testing.assert_close(x, x_star, atol=1e-5, rtol=0)  # straight paths: exact on any grid


@pytest.mark.parametrize("path,steps,tol", [("gvp", 50, 3e-3), ("vp", 50, 0.1), ("vp", 200, 0.06)])
def test_ode_samplers_on_curved_paths_converge_to_the_data_point(path, steps, tol):
    """gvp: first order in h. vp's s(t) ~ sqrt(beta_min t) near t = 0, so the last step (Euler, from t = h) leaves
    about s(h) / 2 of the noise: an error that shrinks like sqrt(h) only (0.011 per unit of noise at 200 steps)."""
    x_star, e = _randn(*SHAPE, seed=7), _randn(*SHAPE, seed=8)
    v = ideal_velocity(path, "noise", x_star)
    start = sample_start(path, "noise")
    assert (euler_sample(v, e, steps, path=path, start=start) - x_star).abs().max() < tol
    assert (heun_sample(v, e, steps, path=path, start=start) - x_star).abs().max() < tol


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("diffusion", SDE_DIFFUSIONS)
def test_sde_samples_gaussian_data_with_its_mean_and_spread(path, diffusion):
    m, c, e = 0.5, 0.7, _randn(*SHAPE, seed=9)
    for last_step in SDE_LAST_STEPS:
        cfg = SDEConfig(diffusion=diffusion, last_step=last_step)
        x = sde_sample(ideal_velocity(path, "score", m, c), e, 100, path=path, sde=cfg,
                       start=sample_start(path, "score", diffusion), generator=torch.Generator().manual_seed(1))
        assert abs(x.mean().item() - m) < 0.02 and abs(x.std().item() - c) < 0.02, (last_step, x.mean(), x.std())


@pytest.mark.parametrize("path,steps,tol", [("linear", 20, 1e-3), ("gvp", 100, 1e-3), ("vp", 100, 0.1)])
def test_sde_reaches_the_data_point_with_each_last_step(path, steps, tol):
    """Tweedie's last step is exact for an ideal model; euler's is the ODE's step (exact on straight paths);
    mean's keeps -w q dt of the last interval, small for `decreasing` (w = (1 - cos(pi t))^2 / 4 ~ 4e-5 at t = 0.05)
    and `sbdm`'s error is that of the curved path's discretisation (vp: see the ODE test above)."""
    x_star, e = _randn(*SHAPE, seed=7), _randn(*SHAPE, seed=8)
    v = ideal_velocity(path, "velocity", x_star)
    for diffusion, last_step, atol in (("sigma", "tweedie", 1e-5), ("sbdm", "euler", tol),
                                       ("decreasing", "mean", tol)):
        x = sde_sample(v, e, steps, path=path, sde=SDEConfig(diffusion=diffusion, last_step=last_step),
                       start=sample_start(path, "velocity", diffusion), generator=torch.Generator().manual_seed(2))
        assert (x - x_star).abs().max() < atol, (diffusion, last_step, (x - x_star).abs().max())


def test_sde_noise_corrects_a_wrong_start_where_the_ode_cannot():
    """Started from noise of std 1.5 instead of 1, the ODE carries the error to the data (its map is linear: std
    1.5 c); the SDE's noise pulls the samples back towards the right marginals."""
    m, c, e = 0.0, 0.7, 1.5 * _randn(*SHAPE, seed=10)
    v = ideal_velocity("linear", "velocity", m, c)
    assert euler_sample(v, e, 50).std().item() == pytest.approx(1.5 * c, rel=0.05)
    x = sde_sample(v, e, 50, sde=SDEConfig(diffusion="sbdm"), start=sample_start("linear", "velocity", "sbdm"),
                   generator=torch.Generator().manual_seed(3))
    assert abs(x.std().item() - c) < 0.05


def test_sde_without_diffusion_is_euler_and_its_noise_follows_the_generator():
    v = ideal_velocity("gvp", "velocity", _randn(*SHAPE, seed=11), 0.3)
    e = _randn(*SHAPE, seed=12)
    for last_step in ("mean", "euler"):
        x = sde_sample(v, e, 7, 2.0, path="gvp", sde=SDEConfig(norm=0.0, last_step=last_step))
        torch.testing.assert_close(x, euler_sample(v, e, 7, 2.0, path="gvp"), atol=1e-6, rtol=0)
    runs = [sde_sample(v, e, 5, path="gvp", generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    w = diffusion_coefficient("gvp", torch.tensor([[0.0, 0.5, 1.0]]), SDEConfig(diffusion="decreasing"))
    torch.testing.assert_close(w.flatten(), torch.tensor([0.0, 0.25, 1.0]))  # (1 - cos(pi t))^2 / 4


def test_sde_holds_context_frames_clean_or_at_their_noise_level():
    x0, e = _randn(2, 4, 3, 2, 2, seed=13), _randn(2, 4, 3, 2, 2, seed=14)
    mask = torch.tensor([[True, True, False, False]] * 2)
    seen = []

    def v(x, t):
        seen.append((x.clone(), t.clone()))
        return ideal_velocity("vp", "velocity", 0.0, 1.0)(x, t)

    out = sde_sample(v, e, 4, context=x0, context_mask=mask, path="vp", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[mask], x0[mask]) and torch.isfinite(out).all()
    assert all(torch.equal(x[mask], x0[mask]) and (t[mask] == 0).all() and (t[~mask] > 0).all() for x, t in seen)
    seen.clear()
    held = noisy(x0, e, torch.full((2, 4), 0.1), "vp")
    out = sde_sample(v, e, 4, context=x0, context_mask=mask, context_t=0.1, path="vp")
    assert torch.equal(out[mask], held[mask])
    assert all(torch.equal(x[mask], held[mask]) and torch.allclose(t[mask], torch.tensor(0.1)) for x, t in seen)


def test_time_grid_starts_where_asked():
    torch.testing.assert_close(time_grid(4, start=0.999), 0.999 * time_grid(4))
    with pytest.raises(ValueError, match="start in"):
        time_grid(4, start=0.0)
    with pytest.raises(ValueError, match="diffusion"):
        SDEConfig(diffusion="sbdn")


# ------------------------------------------------------------------------------ the pipeline: KV-cache rollouts
class Oracle(torch.nn.Module):
    """A stand-in for a causal VideoDiT that knows the video: frame k of every sample is X_STAR[k]. It answers
    with the exact prediction for that point, places frames after the KV cache's position as the DiT does, and
    checks that every frame committed to the cache is the (generated) data point at t = 0."""

    def __init__(self, x_star, path, prediction):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(in_channels=x_star.shape[1], attention="causal", patch_size_t=1, patch_size=1,
                                 num_actions=0)
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])
        self.x_star, self.path, self.prediction, self.committed = x_star, path, prediction, []

    device, dtype = torch.device("cpu"), torch.float32  # what DiffusionPipeline asks its modules

    def forward(self, x, t, actions=None, kv_cache=None, update_cache=False):
        first = 0 if kv_cache is None else kv_cache.position
        star = self.x_star[first:first + x.shape[1]][None]  # (1, F, C, h, w)
        if update_cache:
            assert (t == 0).all()
            self.committed.append((first, (x - star).abs().max().item()))
            kv_cache.advance(x.shape[1], 1)
            return torch.zeros_like(x)
        return ideal(self.path, self.prediction, star)(x.float(), t)

    def commit(self, x, t, kv_cache, actions=None):  # VideoDiT.commit: what a rollout does with a generated frame
        self.forward(x, t, actions, kv_cache=kv_cache, update_cache=True)


@pytest.mark.parametrize("path,prediction,sampler,sde", [
    ("linear", "score", "euler", None), ("gvp", "noise", "sde", SDEConfig(diffusion="sbdm", last_step="tweedie")),
    ("vp", "velocity", "sde", SDEConfig(last_step="tweedie")), ("linear", "noise", "heun", None),
    ("linear", "data", "heun", None)])
def test_kv_cache_rollout_of_an_ideal_model_generates_the_video(path, prediction, sampler, sde):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from minisora.pipeline import DiTPipeline
    from minisora.vae import build_vae, tiny_vae_config

    torch.manual_seed(0)
    x_star = _randn(11, 4, 4, 4, seed=15)  # a video of 11 latent frames
    oracle = Oracle(x_star, path, prediction)
    pipe = DiTPipeline(oracle, build_vae("kl", tiny_vae_config("kl")).model, FlowMatchEulerDiscreteScheduler(),
                       window_frames=4, latent_size=[4, 4], path=path, prediction=prediction)
    out = pipe(context_latents=x_star[None, :2].repeat(3, 1, 1, 1, 1), num_frames=11, num_inference_steps=6,
               chunk=2, sampler=sampler, sde=sde, kv_cache="rolling", output_type="latent", progress=False,
               generator=torch.Generator().manual_seed(0))
    assert out.kv_cache == "rolling" and out.latents.shape == (3, 11, 4, 4, 4)
    torch.testing.assert_close(out.latents, x_star[None].expand(3, -1, -1, -1, -1), atol=1e-4, rtol=0)
    assert [first for first, _ in oracle.committed] == [0, 2, 4, 6, 8]  # the context, then each new chunk once
    assert max(err for _, err in oracle.committed) < 1e-4


# ------------------------------------------------------------------------------ train, the run's record, sample
def test_train_records_the_flow_and_sample_follows_it_old_runs_load_as_linear_velocity(tmp_path):
    from _store_helpers import synthetic_store
    from cli.main import app
    from minisora.pipeline import DiTPipeline
    from minisora.run_dir import PIPELINE_JSON, RunDirError

    synthetic_store(tmp_path, clips=2, test_clips=1)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "store"), "--out", str(run), "--frames", "3",
                                 "--batch-size", "1", "--steps", "2", "--warmup", "1", "--path", "vp",
                                 "--prediction", "score", "--device", "cpu", "--patch-size", "4"])
    assert r.exit_code == 0, r.output
    pdir = sorted((run / "checkpoints").glob("step-*"))[-1] / "pipeline"
    assert json.loads((pdir / PIPELINE_JSON).read_text())["flow"] == {"path": "vp", "prediction": "score"}
    assert (DiTPipeline.from_run(run).config.path, DiTPipeline.from_run(run).config.prediction) == ("vp", "score")
    r = CliRunner().invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "v"), "--steps", "2",
                                 "--sampler", "sde", "--sde-diffusion", "sbdm", "--sde-last-step", "tweedie",
                                 "--format", "npz"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v.npz").is_file()
    r = CliRunner().invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "w"), "--sampler", "sde",
                                 "--sde-last-step", "median"])
    assert r.exit_code != 0 and "--sde-last-step" in r.output and "median" in r.output
    old = tmp_path / "old"  # the format before SiT's choices: no "flow" in minisora_pipeline.json
    shutil.copytree(pdir, old)
    meta = json.loads((old / PIPELINE_JSON).read_text())
    del meta["flow"]
    (old / PIPELINE_JSON).write_text(json.dumps(meta))
    pipe = DiTPipeline.from_run(old)
    assert (pipe.config.path, pipe.config.prediction) == ("linear", "velocity")
    (old / PIPELINE_JSON).write_text(json.dumps(meta | {"flow": {"path": "cosine", "prediction": "score"}}))
    with pytest.raises(RunDirError, match="minisora_pipeline.json's flow: path must be one of .*'cosine'"):
        DiTPipeline.from_run(old)
