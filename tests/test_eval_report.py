"""The honest parts of `minisora eval`: latent-copy baseline, PSNR of the mean MSE, the exact-repeat share,
per-horizon curves and their plot, the strongest-baseline summary and --num-clips on a short split.

Each number is checked against a hand computation on a tiny example, then once end to end on a tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _store_helpers import synthetic_store
from cli.main import app
from minisora.metrics import exact_repeat_share, frame_errors, horizon_curves, psnr_of_mean_mse
from minisora.plots import line_panels_png
from stages.evaluate import clip_interval, model_summary, score, select_clips, versus_strongest


def _pair(mse_per_frame: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, T, 3, 12, 12) whose per-frame MSE against a mid-grey target is exactly the given value."""
    target = torch.full((len(mse_per_frame), len(mse_per_frame[0]), 3, 12, 12), 0.5, dtype=torch.float64)
    offset = torch.tensor(mse_per_frame, dtype=torch.float64).sqrt()[:, :, None, None, None]
    return target + offset, target


# ------------------------------------------------------------------------------------ pure metrics


def test_psnr_of_mean_mse_against_the_mean_of_per_frame_psnr():
    pred, target = _pair([[0.01, 0.0001]])  # per-frame PSNR 20 and 40 dB
    e = frame_errors(pred, target)
    torch.testing.assert_close(e["mse"], torch.tensor([[0.01, 0.0001]], dtype=torch.float64))
    assert e["psnr"].mean().item() == pytest.approx(30.0)  # TECO's mean of decibels
    assert psnr_of_mean_mse(e["mse"]) == pytest.approx(10 * math.log10(1 / 0.00505))  # 22.97 dB
    # an exact copy (the 100 dB cap) inflates TECO's mean, not the MSE-based PSNR
    pred[0, 1] = target[0, 1]
    e = frame_errors(pred, target)
    assert e["psnr"].mean().item() == pytest.approx(60.0)
    assert psnr_of_mean_mse(e["mse"]) == pytest.approx(10 * math.log10(1 / 0.005))  # 23.01 dB
    assert psnr_of_mean_mse(torch.zeros(2, 3)) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="empty"):
        psnr_of_mean_mse(torch.zeros(0))


def test_exact_repeat_share_counts_frames_equal_to_their_predecessor():
    a, b, c = (np.full((2, 2, 3), v, np.uint8) for v in (10, 20, 30))
    video = np.stack([np.stack([a, a, b, b]), np.stack([a, b, c, c])])  # (2, 4, 2, 2, 3)
    assert exact_repeat_share(video, 1) == pytest.approx(3 / 6)  # clip 0: t=1, 3; clip 1: t=3
    assert exact_repeat_share(video, 2) == pytest.approx(2 / 4)
    assert exact_repeat_share(video, 3) == 1.0
    video[0, 3, 0, 0, 0] += 1  # one sub-pixel differs: no longer a repeat
    assert exact_repeat_share(video, 3) == 0.5
    with pytest.raises(ValueError, match="1 <= start < T.*start 4"):
        exact_repeat_share(video, 4)


def test_horizon_curves_average_over_clips_and_seeds_per_index():
    pred, target = _pair([[0.01, 0.0001], [0.0001, 0.0001]])
    e = frame_errors(pred, target)
    h = horizon_curves(e)
    assert h["psnr"] == pytest.approx([30.0, 40.0])  # (20 + 40) / 2, (40 + 40) / 2
    assert h["psnr_mse"] == pytest.approx([10 * math.log10(1 / 0.00505), 40.0])
    assert h["ssim"] == pytest.approx(e["ssim"].mean(dim=0).tolist())
    stacked = {k: torch.stack([v, v]) for k, v in e.items()}  # (S=2, B, T): two equal seeds change nothing
    assert all(horizon_curves(stacked)[k] == pytest.approx(h[k]) for k in h)


# ------------------------------------------------------------------------------------ report functions


def test_score_and_model_summary_by_hand():
    seeds = [frame_errors(*_pair([[0.01, 0.0001], [0.0001, 0.0001]])),  # psnr 20/40, 40/40 -> 35
             frame_errors(*_pair([[0.0001, 0.0001], [0.0001, 0.0001]]))]  # all 40
    s = score(seeds[0])
    assert s["psnr"] == pytest.approx(35.0) and s["psnr_mse"] == pytest.approx(10 * math.log10(4 / 0.0103))
    assert set(s) == {"psnr", "ssim", "psnr_mse", "per_horizon"}
    model, per_seed = model_summary(seeds)
    assert [p["psnr"] for p in per_seed] == pytest.approx([35.0, 40.0])
    assert model["psnr"] == pytest.approx({"mean": 37.5, "std": 2.5, "n": 2})
    assert model["psnr_mse"]["mean"] == pytest.approx((10 * math.log10(4 / 0.0103) + 40.0) / 2)
    assert model["per_horizon"]["psnr"] == pytest.approx([(30.0 + 40.0) / 2, 40.0])


def test_summary_compares_against_the_strongest_copy_baseline_not_the_ceiling():
    model = {"psnr": {"mean": 18.0, "std": 0.1}, "ssim": {"mean": 0.5, "std": 0.0},
             "psnr_mse": {"mean": 17.0, "std": 0.2}}
    baselines = {"repeat_last_context_frame": {"psnr": 24.0, "ssim": 0.6, "psnr_mse": 16.0},  # inflated by still frames
                 "latent_copy": {"psnr": 16.5, "ssim": 0.4, "psnr_mse": 16.6},
                 "vae_reconstruction": {"psnr": 21.0, "ssim": 0.7, "psnr_mse": 20.0}}
    vs = versus_strongest(model, baselines)
    assert vs["name"] == "latent_copy"
    assert vs["psnr_mse_gain_db"] == pytest.approx(0.4) and vs["psnr_gain_db"] == pytest.approx(1.5)
    assert vs["ssim_gain"] == pytest.approx(0.1) and vs["beats_by_more_than_seed_std"] is True
    model["psnr_mse"]["std"] = 0.5  # a gain inside the seed spread is not a win
    assert versus_strongest(model, baselines)["beats_by_more_than_seed_std"] is False


def test_select_clips_warns_and_uses_what_the_split_has():
    lengths = np.array([20, 5, 20, 16])
    assert select_clips(lengths, 16, 2, "test") == [0, 2]
    with pytest.warns(UserWarning, match="--num-clips 8: split 'test' has only 3 clips with 16 latent frames"):
        assert select_clips(lengths, 16, 8, "test") == [0, 2, 3]
    with pytest.raises(ValueError, match="no clip in test has 21 latent frames"):
        select_clips(lengths, 21, 8, "test")


def test_line_panels_png_draws_every_series(tmp_path):
    path = line_panels_png(tmp_path / "p.png", {"PSNR": {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]},
                                                "SSIM": {"a": [0.1, 0.2, 0.3], "b": [0.3, 0.3, 0.3]}})
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] == 2 * 420 and img.shape[0] > 300
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # both methods' lines are drawn
    assert line_panels_png(tmp_path / "q.png", {"PSNR": {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]},
                                                "SSIM": {"a": [0.1, 0.2, 0.3], "b": [0.3, 0.3, 0.3]}}).read_bytes() \
        == path.read_bytes()
    with pytest.raises(ValueError, match="non-empty series"):
        line_panels_png(tmp_path / "r.png", {"PSNR": {"a": []}})


# ------------------------------------------------------------------------------------ end to end

K, N = 2, 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 train + 2 test synthetic DMLab clips of 12 frames, a tiny random VAE, a store at 16x16, 10 training steps."""
    from stages.train import TrainConfig, main as train_main

    root = tmp_path_factory.mktemp("evalrep")
    synthetic_store(root, clips=4, test_clips=2)
    train_main(TrainConfig(store=str(root / "store"), out=str(root / "run"), frames=4, batch_size=2, steps=10, warmup=1,
                           lr=1e-3, ckpt_every=10, log_every=10, use_actions=True, ema_decay=0.5, device="cpu"))
    return root


def test_eval_report_has_latent_copy_mse_psnr_repeat_share_and_horizons(trained, tmp_path):
    from minisora.metrics import frames_to_unit
    from minisora.store import LatentStore
    from minisora.vae import VideoVAE, pixels_to_frames
    from stages.evaluate import EvalConfig, format_table, main
    from minisora.context import clip_frames
    from minisora.pipeline import DiTPipeline

    out = tmp_path / "eval.json"
    cfg = EvalConfig(checkpoint=str(trained / "run"), store=str(trained / "store"), context_frames=K, frames=N,
                     num_clips=5, seeds=2, steps=2, out=str(out), device="cpu")
    with pytest.warns(UserWarning, match="--num-clips 5: split 'test' has only 2 clips with 6 latent frames"):
        main(cfg)
    rep = json.loads(out.read_text())
    assert rep["num_clips_requested"] == 5 and rep["num_clips_used"] == 2 and len(rep["clips"]) == 2

    # hand computation from the source clips, the VAE and the store
    store = LatentStore(trained / "store")
    manifest = store.manifest_json()
    pipe = DiTPipeline.from_run(str(trained / "run"))
    truth = np.stack([clip_frames(pipe, Path(manifest["root"]) / c, "dmlab")[0][:N] for c in rep["clips"]])
    gt = frames_to_unit(truth[:, K:])
    means = torch.from_numpy(store.array("test", "mean")[:2, :N].astype(np.float32))
    copied = torch.cat([means[:, :K], means[:, K - 1:K].expand(-1, N - K, -1, -1, -1)], dim=1)
    copy = frames_to_unit(pixels_to_frames(VideoVAE.load(str(trained / "vae")).decode(copied))[:, K:])
    mse = (copy.double() - gt.double()).pow(2).mean(dim=(2, 3, 4))  # (clips, generated frames)
    lc = rep["baselines"]["latent_copy"]
    assert lc["psnr_mse"] == pytest.approx(10 * math.log10(1 / mse.mean().item()), abs=1e-3)
    assert lc["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), abs=1e-3)
    assert lc["per_horizon"]["psnr_mse"] == pytest.approx((10 * torch.log10(1 / mse.mean(dim=0))).tolist(), abs=1e-3)
    assert len(lc["per_horizon"]["ssim"]) == N - K and len(rep["model"]["per_horizon"]["psnr"]) == N - K
    same = [(truth[b, t] == truth[b, t - 1]).all() for b in range(2) for t in range(K, N)]
    assert rep["target_exact_repeat_share"] == pytest.approx(np.mean(same))
    for name in ("repeat_last_context_frame", "latent_copy", "vae_reconstruction"):
        assert set(rep["baselines"][name]) == {"psnr", "ssim", "psnr_mse", "per_horizon"}, name
    assert rep["model"]["psnr_mse"]["n"] == 2 and all("psnr_mse" in s for s in rep["per_seed"])
    vs = rep["vs_strongest_baseline"]
    strongest = max(("repeat_last_context_frame", "latent_copy"), key=lambda b: rep["baselines"][b]["psnr_mse"])
    assert vs["name"] == strongest
    gain = rep["model"]["psnr_mse"]["mean"] - rep["baselines"][strongest]["psnr_mse"]
    assert vs["psnr_mse_gain_db"] == pytest.approx(gain)
    boot = vs["clip_bootstrap"]  # the same gain, and how much resampling the 2 clips moves it
    assert boot["gain_db"] == pytest.approx(gain) and boot["ci95_db"][0] <= boot["ci95_db"][1] and boot["std_db"] >= 0
    assert rep["psnr_mse_gain_over_latent_copy_db"] == pytest.approx(rep["model"]["psnr_mse"]["mean"] - lc["psnr_mse"])

    plot = Path(rep["horizon_plot"])
    assert plot == tmp_path / "eval_horizon.png" and Image.open(plot).format == "PNG"
    table = format_table(rep)
    assert f"model vs the strongest baseline ({strongest}): {vs['psnr_mse_gain_db']:+.2f} dB" in table
    assert f"95% interval over resampled clips {boot['ci95_db'][0]:+.2f} to {boot['ci95_db'][1]:+.2f} dB" in table
    assert clip_interval([-0.35, 1.55]).endswith("-0.35 to +1.55 dB (includes 0)")
    assert clip_interval([1.12, 3.19]).endswith("+1.12 to +3.19 dB")
    assert f"latent_copy {lc['psnr_mse']:.2f}" in table and "copy last context latent" in table


def test_eval_cli_num_clips_warns_on_stderr(trained, tmp_path):
    r = CliRunner().invoke(app, ["eval", "--checkpoint", str(trained / "run"), "--store", str(trained / "store"),
                                 "--context-frames", str(K), "--frames", str(N), "--num-clips", "3", "--seeds", "1",
                                 "--steps", "1", "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "--num-clips 3: split 'test' has only 2 clips" in r.output
    assert json.loads((tmp_path / "r.json").read_text())["num_clips_used"] == 2


def test_eval_context_noise_reaches_the_sampler(trained, tmp_path):
    from stages.evaluate import EvalConfig, main

    base = dict(checkpoint=str(trained / "run"), store=str(trained / "store"), context_frames=K, frames=N, num_clips=2,
                seeds=1, steps=2, device="cpu")
    clean = main(EvalConfig(**base, out=str(tmp_path / "a.json")))
    noisy = main(EvalConfig(**base, context_noise=0.3, out=str(tmp_path / "b.json")))
    assert noisy["config"]["context_noise"] == 0.3 and clean["config"]["context_noise"] == 0.0
    assert noisy["per_seed"][0]["psnr_mse"] != clean["per_seed"][0]["psnr_mse"]
    assert noisy["baselines"] == clean["baselines"]  # the baselines do not sample


def test_eval_heun_sampler_runs_and_is_recorded(trained, tmp_path):
    from stages.evaluate import EvalConfig, main

    base = dict(checkpoint=str(trained / "run"), store=str(trained / "store"), context_frames=K, frames=N, num_clips=2,
                seeds=1, device="cpu")
    euler = main(EvalConfig(**base, steps=3, out=str(tmp_path / "e.json")))
    heun = main(EvalConfig(**base, steps=2, sampler="heun", out=str(tmp_path / "h.json")))  # 3 model calls each
    assert heun["config"]["sampler"] == "heun" and euler["config"]["sampler"] == "euler"
    assert heun["per_seed"][0]["psnr_mse"] != euler["per_seed"][0]["psnr_mse"]
    sde = main(EvalConfig(**base, steps=3, sampler="sde", out=str(tmp_path / "s.json")))  # SiT's SDE, its defaults
    assert sde["config"]["sde"] == {"diffusion": "sigma", "norm": 1.0, "last_step": "mean"}
    assert sde["per_seed"][0]["psnr_mse"] != euler["per_seed"][0]["psnr_mse"]
    with pytest.raises(ValueError, match="sampler must be one of euler, heun, sde, got 'rk4'"):
        main(EvalConfig(**base, steps=2, sampler="rk4", out=str(tmp_path / "x.json")))
