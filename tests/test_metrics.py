"""Metrics: PSNR/SSIM against hand-computed values and independent references, the Frechet distance
against closed forms, and the FVD path through a stand-in TorchScript network built here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minisora.metrics import (
    I3D_MIN_FRAMES,
    I3DFeatures,
    clip_bootstrap_gain,
    frame_metrics,
    frechet_distance,
    fvd,
    gaussian_stats,
    lpips_available,
    psnr_of_mean_mse,
    psnr_per_frame,
    ssim_per_frame,
    summarize_seeds,
    video_metrics,
)


def _frames(seed: int, shape=(2, 3, 3, 16, 20)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------ PSNR


def test_psnr_constant_offset_gives_known_value():
    target = 0.2 + 0.6 * _frames(0)  # in [0.2, 0.8] so the offsets below stay inside [0, 1]
    offsets = torch.tensor([0.1, 0.01, 0.05], dtype=torch.float64)  # one per frame: mse = offset^2
    pred = target + offsets.view(1, 3, 1, 1, 1)
    got = psnr_per_frame(pred, target)
    assert got.shape == (2, 3)
    expected = torch.tensor([20.0, 40.0, 10 * math.log10(1 / 0.0025)], dtype=torch.float64)
    torch.testing.assert_close(got, expected.expand(2, 3), atol=1e-9, rtol=0)
    # data range 2 (pixels in [-1, 1]) adds 20 log10(2) dB
    torch.testing.assert_close(psnr_per_frame(pred, target, data_range=2.0), got + 20 * math.log10(2), atol=1e-9,
                               rtol=0)


def test_psnr_identical_frames_hit_the_mse_floor():
    x = _frames(1)
    assert torch.all(psnr_per_frame(x, x) == 100.0)  # 10 log10(1 / 1e-10)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 16, 20\) vs \(2, 3, 3, 16, 19\)"):
        psnr_per_frame(_frames(0), _frames(0, (2, 3, 3, 16, 19)))
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\), got \(2, 3, 1, 16, 20\)"):
        ssim_per_frame(_frames(0, (2, 3, 1, 16, 20)), _frames(0, (2, 3, 1, 16, 20)))


# ------------------------------------------------------------------------------------ SSIM


def _ssim_reference_valid(x: np.ndarray, y: np.ndarray, window=11, sigma=1.5, data_range=1.0) -> float:
    """Wang et al. 2004 on one (C, H, W) pair, written out window by window with numpy."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    r = np.arange(window) - (window - 1) / 2
    w2 = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    w2 /= w2.sum()
    per_channel = []
    for xc, yc in zip(x, y):
        px = np.lib.stride_tricks.sliding_window_view(xc, (window, window))  # (H-10, W-10, 11, 11)
        py = np.lib.stride_tricks.sliding_window_view(yc, (window, window))
        mx = (px * w2).sum(axis=(-2, -1))
        my = (py * w2).sum(axis=(-2, -1))
        vx = (((px - mx[..., None, None]) ** 2) * w2).sum(axis=(-2, -1))
        vy = (((py - my[..., None, None]) ** 2) * w2).sum(axis=(-2, -1))
        cxy = ((px - mx[..., None, None]) * (py - my[..., None, None]) * w2).sum(axis=(-2, -1))
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        per_channel.append(s.mean())
    return float(np.mean(per_channel))


def test_ssim_of_identical_frames_is_one():
    x = _frames(2)
    torch.testing.assert_close(ssim_per_frame(x, x), torch.ones(2, 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_ssim_matches_windowed_numpy_reference():
    x = _frames(3)
    y = (x + 0.15 * _frames(4)).clamp(0, 1)
    got = ssim_per_frame(y, x)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            ref = _ssim_reference_valid(y[b, t].numpy(), x[b, t].numpy())
            assert abs(float(got[b, t]) - ref) < 1e-10
    ref2 = _ssim_reference_valid(2 * y[0, 0].numpy() - 1, 2 * x[0, 0].numpy() - 1, data_range=2.0)
    assert abs(float(ssim_per_frame(2 * y - 1, 2 * x - 1, data_range=2.0)[0, 0]) - ref2) < 1e-10


def test_ssim_matches_skimage_style_filter_then_crop():
    """skimage's gaussian_weights=True path: filter with scipy (reflect padding, truncate 3.5 gives
    the same 11 taps), then crop the 5-pixel border; equals the 'valid' computation."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _frames(5)[0, 0].numpy()
    y = np.clip(x + 0.1 * _frames(6)[0, 0].numpy(), 0, 1)
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for xc, yc in zip(x, y):
        f = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
        mx, my = f(xc), f(yc)
        vx, vy, cxy = f(xc * xc) - mx**2, f(yc * yc) - my**2, f(xc * yc) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(s[5:-5, 5:-5].mean())
    got = ssim_per_frame(torch.from_numpy(y)[None, None], torch.from_numpy(x)[None, None])
    assert abs(float(got) - float(np.mean(vals))) < 1e-9


def test_ssim_decreases_with_noise():
    x = 0.1 + 0.8 * _frames(7, (1, 1, 3, 32, 32))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    scores = [float(ssim_per_frame(x + s * noise, x)) for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert scores[0] == pytest.approx(1.0, abs=1e-12)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_ssim_rejects_frames_smaller_than_the_window():
    x = _frames(0, (1, 1, 3, 10, 32))
    with pytest.raises(ValueError, match="at least 11x11 pixels .* got 10x32"):
        ssim_per_frame(x, x)


def test_video_metrics_average_frames_per_clip():
    x = _frames(9)
    y = (x + 0.05 * _frames(10)).clamp(0, 1)
    m = video_metrics(y, x)
    assert set(m) == {"psnr", "ssim"} and m["psnr"].shape == (2,) and m["ssim"].shape == (2,)
    torch.testing.assert_close(m["psnr"], psnr_per_frame(y, x).mean(dim=1))
    torch.testing.assert_close(m["ssim"], ssim_per_frame(y, x).mean(dim=1))


def test_frame_metrics_keep_every_frame_index():
    """Quality vs horizon: a clip whose k-th frame carries k times the error scores lower at every later index."""
    x = _frames(11, (2, 4, 3, 16, 16))
    noise = 0.02 * _frames(12, (2, 4, 3, 16, 16))
    y = (x + noise * torch.arange(1, 5).view(1, 4, 1, 1, 1)).clamp(0, 1)
    m = frame_metrics(y, x)
    assert m["psnr"].shape == m["ssim"].shape == (2, 4) and m["psnr"].dtype == torch.float64
    torch.testing.assert_close(m["psnr"], psnr_per_frame(y, x))
    torch.testing.assert_close(m["ssim"], ssim_per_frame(y, x))
    by_index = m["psnr"].mean(dim=0)
    assert (by_index[1:] < by_index[:-1]).all() and (m["ssim"].mean(dim=0).diff() < 0).all()
    torch.testing.assert_close(video_metrics(y, x)["psnr"], m["psnr"].mean(dim=1))


def test_summarize_seeds_uses_population_std():
    assert summarize_seeds([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "std": math.sqrt(1.25), "n": 4}
    assert summarize_seeds([7.0]) == {"mean": 7.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="at least one value"):
        summarize_seeds([])


# ------------------------------------------------------------------------------------ Frechet


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = float(np.sum((mu1 - mu2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)))  # 0.25+9 + 4+1 + 0
    assert expected == pytest.approx(14.25)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-12)
    # 1-D
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(
        4.0 + 4.0 + 1.0 - 2.0 * 2.0, abs=1e-12
    )


def test_frechet_distance_zero_for_identical_stats_and_matches_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    mu1, s1 = gaussian_stats(a)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    mu2, s2 = gaussian_stats(rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 1.0)
    linalg = pytest.importorskip("scipy.linalg")
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(ref), rel=1e-9)
    with pytest.raises(ValueError, match=r"mu1 \(6,\), sigma1 \(6, 6\), mu2 \(5,\)"):
        frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_gaussian_stats_is_mean_and_unbiased_covariance():
    feats = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match=r"N >= 2, got shape \(1, 4\)"):
        gaussian_stats(feats[:1])


# ------------------------------------------------------------------------------------ FVD


class StandInI3D(nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt; insists on what the real one needs
    (3 x T x 224 x 224 in [-1, 1]) and maps a pooled video to 400 features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4 * 4 * 4, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("stand-in I3D wants (B, 3, T, 224, 224)")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("stand-in I3D wants values in [-1, 1]")
        pooled = F.adaptive_avg_pool3d(x, (4, 4, 4)).flatten(1)  # (B, 192)
        return self.proj(pooled)


class ProbeI3D(nn.Module):
    """Reports what it was given: min, max, shape (C, T, H, W) and the three flags."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        b = x.shape[0]
        row = torch.tensor(
            [float(x.min()), float(x.max()), float(x.shape[1]), float(x.shape[2]), float(x.shape[3]),
             float(x.shape[4]), float(rescale), float(resize), float(return_features)]
        )
        return row.expand(b, 9)


def _script(module: nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


def _videos(seed: int, n: int = 8, t: int = I3D_MIN_FRAMES, hw: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 0.7, size=(n, t, hw, hw, 3)).astype(np.float32)


def test_i3d_preprocessing_reaches_the_network_as_stylegan_v_expects(tmp_path):
    probe = I3DFeatures(_script(ProbeI3D(), tmp_path / "probe.pt"))
    zeros = np.zeros((2, 10, 16, 24, 3), np.uint8)  # non-square frames are resized to 224x224 too
    out = probe(zeros)
    np.testing.assert_array_equal(out, np.tile([-1.0, -1.0, 3, 10, 224, 224, 0, 0, 1], (2, 1)))
    full = probe(np.full((1, 9, 8, 8, 3), 255, np.uint8))
    assert full[0, :2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    half = probe(torch.full((3, 9, 224, 224, 3), 0.5))
    assert half.shape == (3, 9) and half[0, :2].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_fvd_with_stand_in_network(tmp_path):
    i3d = I3DFeatures(_script(StandInI3D(), tmp_path / "i3d.pt"))
    real = _videos(0)
    feats = i3d(real, batch_size=3)  # batches of 3, 3, 2
    assert feats.shape == (8, 400) and feats.dtype == np.float64
    # uint8 input is the same frames divided by 255
    as_uint8 = np.round(real * 255).astype(np.uint8)
    np.testing.assert_allclose(i3d(as_uint8), i3d(as_uint8.astype(np.float32) / 255), atol=1e-6)
    assert fvd(feats, i3d(real.copy())) == pytest.approx(0.0, abs=1e-6)
    shifted = fvd(feats, i3d(real + 0.3))
    other = fvd(feats, i3d(_videos(1)))
    assert shifted > 0.1 and shifted > other


def test_i3d_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt: no I3D TorchScript file"):
        I3DFeatures(tmp_path / "missing.pt")
    i3d = I3DFeatures(_script(ProbeI3D(), tmp_path / "probe.pt"))
    with pytest.raises(ValueError, match="at least 9 frames per video, got 8"):
        i3d(np.zeros((1, 8, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-1, 1\]"):
        i3d(np.full((1, 9, 16, 16, 3), -1.0, np.float32) + np.eye(16, dtype=np.float32)[None, None, :, :, None] * 2)
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\), got \(1, 9, 3, 16, 16\)"):
        i3d(np.zeros((1, 9, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="N, D\\) features of one width"):
        fvd(np.zeros((4, 3)), np.zeros((4, 2)))


def test_lpips_available_needs_local_weights(tmp_path):
    assert lpips_available(tmp_path / "missing_alex.pth") is False


def test_clip_bootstrap_gain_sees_how_much_the_choice_of_clips_moves_a_gain():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(16, 12, generator=g, dtype=torch.float64) * 0.01 + 0.005  # (clips, frames)
    # every clip halves its MSE: every resample gives the same gain, 10 log10(2)
    steady = clip_bootstrap_gain(torch.stack([base / 2, base / 2]), base)
    assert steady["gain_db"] == pytest.approx(10 * math.log10(2))
    assert steady["std_db"] == pytest.approx(0, abs=1e-9)
    assert steady["ci95_db"] == pytest.approx([10 * math.log10(2)] * 2)
    # the gain on the clips given is the report's: the seeds' mean PSNR of the mean MSE minus the baseline's
    seeds = torch.rand(2, 16, 12, generator=g, dtype=torch.float64) * 0.01 + 0.004
    r = clip_bootstrap_gain(seeds, base, resamples=500, seed=3)
    expected = (psnr_of_mean_mse(seeds[0]) + psnr_of_mean_mse(seeds[1])) / 2 - psnr_of_mean_mse(base)
    assert r["gain_db"] == pytest.approx(expected) and r["resamples"] == 500 and r["seed"] == 3
    assert r["ci95_db"][0] < r["gain_db"] < r["ci95_db"][1] and r["std_db"] > 0
    assert clip_bootstrap_gain(seeds, base, resamples=500, seed=3) == r  # deterministic for a seed
    assert clip_bootstrap_gain(seeds, base, resamples=500, seed=4)["ci95_db"] != r["ci95_db"]
    # one clip carries the whole gain: a third of the resamples leave it out, so the interval starts at 0
    lucky = base.clone()
    lucky[0] /= 100
    one = clip_bootstrap_gain(lucky, base)
    assert one["gain_db"] > 0.25 and one["ci95_db"][0] == pytest.approx(0, abs=1e-9) and one["ci95_db"][1] > 0.4
    with pytest.raises(ValueError, match="same B >= 1 clips"):
        clip_bootstrap_gain(seeds, base[:8])
