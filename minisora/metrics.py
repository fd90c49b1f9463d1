"""Video prediction metrics, following TECO's evaluation protocol (Yan et al. 2023).

The protocol `minisora eval` builds from these functions:

- metrics are computed on generated frames only (context frames are left out by the caller);
- PSNR and SSIM are computed per frame (`frame_errors`, `frame_metrics`), averaged over time, then
  over clips (`video_metrics`);
- beside TECO's mean of per-frame PSNR, the PSNR of the MSE averaged over frames (`psnr_of_mean_mse`),
  which identical frames cannot inflate, the share of still target frames (`exact_repeat_share`)
  and the metrics against the generated-frame index (`horizon_curves`);
- each number is reported as mean and std over repeats (`summarize_seeds`), and a gain over a baseline also
  with how much the choice of clips moves it (`clip_bootstrap_gain`), which the repeats do not see;
- FVD uses I3D features (`I3DFeatures`) and the Frechet distance between two Gaussians (`fvd`).

Frames are `pixels` shaped (B, T, 3, H, W), float in [0, 1]. Nothing here clamps or quantises:
TECO scores uint8 frames divided by 255, so a caller that wants its numbers clamps and rounds
decoded frames to that grid first.

Pure functions on tensors and arrays; the only I/O is loading a TorchScript I3D file that the user
supplies (`I3DFeatures`). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MSE_FLOOR = 1e-10  # PSNR clamps the per-frame MSE here, so identical frames give 10*log10(range^2/1e-10)
SSIM_K1, SSIM_K2 = 0.01, 0.03
I3D_RESOLUTION = 224  # the Kinetics-400 I3D takes 224x224 frames
I3D_MIN_FRAMES = 9  # fewer frames and the I3D's temporal pooling has nothing left to pool
_SSIM_CHUNK = 64  # frames per SSIM pass: bounds memory of the float64 filtered maps


def frames_to_unit(frames: np.ndarray | Tensor) -> Tensor:
    """uint8 frames (B, T, H, W, 3) -> float (B, T, 3, H, W) in [0, 1], what the metrics take."""
    x = torch.as_tensor(np.ascontiguousarray(frames))
    return x.permute(0, 1, 4, 2, 3).float() / 255.0


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != 5 or pred.shape[2] != 3:
        raise ValueError(f"frames must be (B, T, 3, H, W), got {tuple(pred.shape)}")


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM


def psnr_per_frame(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR of every frame, (B, T, 3, H, W) -> (B, T) float64.

    PSNR = 10 log10(data_range^2 / mse), mse averaged over the channels and pixels of one frame
    (as TECO). The mse is clamped at MSE_FLOOR = 1e-10 so identical frames give a finite value
    (100 dB for data_range 1) instead of +inf, which would swallow any average it enters.
    """
    _check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean(dim=(2, 3, 4))  # (B, T)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR))


def gaussian_window(window: int, sigma: float) -> Tensor:
    """Normalised 1-D Gaussian taps centred on (window - 1) / 2, float64 (tf.image.ssim's filter,
    whose 2-D kernel is the outer product of this one with itself)."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _ssim_frames(x: Tensor, y: Tensor, data_range: float, g: Tensor) -> Tensor:
    """SSIM of (N, C, H, W) float64 frames -> (N,), on 'valid' windows, averaged over C and pixels."""
    c = x.shape[1]
    kh = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)  # depthwise filter along H
    kw = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)  # depthwise filter along W

    def blur(z: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H-w+1, W-w+1): Gaussian-weighted local mean
        return F.conv2d(F.conv2d(z, kh, groups=c), kw, groups=c)

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2  # biased (weights sum to 1), like skimage's use_sample_covariance=False
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


def ssim_per_frame(
    pred: Tensor, target: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """SSIM of every frame, (B, T, 3, H, W) -> (B, T) float64.

    Wang et al. 2004 with the constants of tf.image.ssim, which TECO re-implements in JAX: an
    11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, biased local (co)variances, computed
    per channel on 'valid' windows only (no padding: the map is (H-10) x (W-10)), averaged over
    the map, then over channels. skimage's structural_similarity with gaussian_weights=True,
    use_sample_covariance=False agrees up to rounding (it filters with padding, then crops the
    border the padding touched). Computed in float64.
    """
    _check_pair(pred, target)
    b, t, c, h, w = pred.shape
    if h < window or w < window:
        raise ValueError(f"SSIM needs frames of at least {window}x{window} pixels (the window), got {h}x{w}")
    g = gaussian_window(window, sigma).to(pred.device)
    x = pred.reshape(b * t, c, h, w)  # (B, T, C, H, W) -> (B*T, C, H, W)
    y = target.reshape(b * t, c, h, w)
    out = [
        _ssim_frames(x[i : i + _SSIM_CHUNK].double(), y[i : i + _SSIM_CHUNK].double(), data_range, g)
        for i in range(0, b * t, _SSIM_CHUNK)
    ]
    return torch.cat(out).view(b, t)


def frame_metrics(pred: Tensor, target: Tensor, data_range: float = 1.0) -> dict[str, Tensor]:
    """PSNR and SSIM of every frame of every clip: {"psnr": (B, T), "ssim": (B, T)} float64."""
    return {"psnr": psnr_per_frame(pred, target, data_range), "ssim": ssim_per_frame(pred, target, data_range)}


def video_metrics(pred: Tensor, target: Tensor, data_range: float = 1.0) -> dict[str, Tensor]:
    """Per-clip PSNR and SSIM, each the mean over the clip's frames: {"psnr": (B,), "ssim": (B,)}.

    The caller passes generated frames only and averages these over clips.
    """
    return {k: v.mean(dim=1) for k, v in frame_metrics(pred, target, data_range).items()}


def frame_errors(pred: Tensor, target: Tensor, data_range: float = 1.0) -> dict[str, Tensor]:
    """Per-frame errors, each (B, T) float64: {"mse", "psnr", "ssim"} (psnr as `psnr_per_frame`)."""
    _check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean(dim=(2, 3, 4))  # (B, T)
    return {"mse": mse, "psnr": 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR)),
            "ssim": ssim_per_frame(pred, target, data_range)}


def psnr_of_mean_mse(mse: Tensor, data_range: float = 1.0) -> float:
    """PSNR of the MSE averaged over every frame given (any shape, e.g. (B, T) from `frame_errors`).

    Unlike TECO's mean of per-frame PSNR, a few identical frames (MSE_FLOOR, 100 dB each) cannot
    dominate it: an exact copy of a still frame adds 0 to the mean MSE instead of 100 dB to a mean
    of decibels. The mean MSE is clamped at MSE_FLOOR like a single frame's.
    """
    if mse.numel() == 0:
        raise ValueError("psnr_of_mean_mse needs at least one frame's MSE, got an empty tensor")
    return float(10.0 * torch.log10(data_range**2 / mse.double().mean().clamp_min(MSE_FLOOR)))


def exact_repeat_share(video: np.ndarray | Tensor, start: int) -> float:
    """The share of frames start..T-1 of (B, T, ...) videos that equal their previous frame exactly.

    With start = K (the first generated frame) this says how much of the target is a still camera,
    where repeating the last context frame scores the PSNR cap. Needs 1 <= start < T.
    """
    v = torch.as_tensor(np.ascontiguousarray(video))
    if v.ndim < 3 or not 1 <= start < v.shape[1]:
        raise ValueError(f"exact_repeat_share needs (B, T, ...) videos and 1 <= start < T, got shape "
                         f"{tuple(v.shape)} and start {start}")
    same = (v[:, start:] == v[:, start - 1 : -1]).flatten(2).all(dim=2)  # (B, T - start)
    return float(same.double().mean())


def horizon_curves(errors: dict[str, Tensor], data_range: float = 1.0) -> dict[str, list[float]]:
    """Metrics against the generated-frame index, from `frame_errors` output (each (B, T)) or (S, B, T) over seeds:
    {"psnr": TECO's per-frame PSNR averaged over clips (and seeds), "psnr_mse": PSNR of the MSE averaged
    over clips (and seeds) at that index, "ssim": SSIM averaged likewise}, each a list of T floats."""
    dims = tuple(range(errors["mse"].ndim - 1))  # all but the last (frame) dimension
    mse = errors["mse"].double().mean(dim=dims).clamp_min(MSE_FLOOR)  # (T,)
    return {"psnr": errors["psnr"].double().mean(dim=dims).tolist(),
            "psnr_mse": (10.0 * torch.log10(data_range**2 / mse)).tolist(),
            "ssim": errors["ssim"].double().mean(dim=dims).tolist()}


def summarize_seeds(values: list[float]) -> dict[str, float | int]:
    """Mean and standard deviation of one metric over repeats (seeds): {"mean", "std", "n"}.

    The std is the population one (ddof=0), as TECO's `np.std` over its evaluation repeats; one
    value gives std 0.
    """
    if len(values) == 0:
        raise ValueError("summarize_seeds needs at least one value, got none")
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": int(arr.size)}


def clip_bootstrap_gain(model_mse: Tensor, baseline_mse: Tensor, resamples: int = 2000, seed: int = 0) -> dict:
    """How much the choice of held-out clips moves a gain in PSNR of the mean MSE: the gain (the model's PSNR of the
    mean MSE, averaged over seeds, minus the baseline's) recomputed on `resamples` sets of clips drawn with
    replacement (a paired bootstrap: the same clips for both). model_mse (S, B, T) over seeds or (B, T), baseline_mse
    (B, T), per-frame MSEs of B clips. Returns {"gain_db" (on the clips given), "std_db", "ci95_db": [2.5%, 97.5%
    percentiles], "resamples", "seed"}; deterministic for a seed. The seed std of a model says how much sampling
    noise moves its score on these clips; this says how much other clips from the same source would."""
    m = model_mse.double().reshape(-1, *model_mse.shape[-2:]).mean(dim=2)  # (S, B): per-clip MSE of each seed
    b = baseline_mse.double().mean(dim=1)  # (B,)
    if m.shape[1] != b.shape[0] or b.numel() == 0 or resamples < 1:
        raise ValueError(f"clip_bootstrap_gain: model {tuple(model_mse.shape)} and baseline "
                         f"{tuple(baseline_mse.shape)} need the same B >= 1 clips, and resamples >= 1")

    def gain(idx: Tensor) -> Tensor:  # idx (R, B) clip indices -> (R,) gains
        model_db = -10.0 * torch.log10(m[:, idx].mean(dim=-1).clamp_min(MSE_FLOOR)).mean(dim=0)  # (R,)
        return model_db + 10.0 * torch.log10(b[idx].mean(dim=-1).clamp_min(MSE_FLOOR))

    idx = torch.randint(b.numel(), (resamples, b.numel()), generator=torch.Generator().manual_seed(seed))
    gains = gain(idx)
    lo, hi = torch.quantile(gains, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"gain_db": float(gain(torch.arange(b.numel())[None])[0]), "std_db": float(gains.std(correction=0)),
            "ci95_db": [lo, hi], "resamples": resamples, "seed": seed}


# ---------------------------------------------------------------------------------------------
# Frechet distance and FVD


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, float64.

    The covariance is the unbiased one (divides by N - 1), as tfgan's Frechet distance that TECO
    calls and as np.cov in the StyleGAN-V-derived FVD code of Diffusion Forcing.
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {feats.shape}")
    mu = feats.mean(axis=0)
    centred = feats - mu
    sigma = centred.T @ centred / (feats.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues
    from rounding are set to 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)

    The last trace equals tr((sigma1 sigma2)^1/2) (the two matrices are similar) but its argument is
    symmetric positive semi-definite, so an eigen-decomposition gives it stably; no scipy sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs mu (D,) and sigma (D, D) for both Gaussians, got "
            f"mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1  # (D, D), symmetric PSD
    eig = np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)
    dist = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(eig)))
    return max(dist, 0.0)  # rounding can leave -1e-12 for identical Gaussians


def fvd(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    """Frechet Video Distance between two sets of (N, D) I3D features (see `I3DFeatures`)."""
    real, fake = np.asarray(real_features), np.asarray(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"FVD needs (N, D) features of one width D, got real {real.shape}, fake {fake.shape}")
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


class I3DFeatures:
    """Kinetics-400 I3D features for FVD, from the TorchScript port StyleGAN-V published
    (`i3d_torchscript.pt`, verified by its authors against the tf.hub I3D that TECO and the original
    FVD code use) and that Diffusion Forcing and FAR load too.

    The network is called as `net(x, rescale=..., resize=..., return_features=True)` with x shaped
    (B, 3, T, H, W); `return_features=True` gives the 400 logits before the softmax (tf.hub's
    "RGB/inception_i3d/Mean:0", the FVD embedding). What the call conventions are, from their code:
    StyleGAN-V's own metric feeds uint8 [0, 255] with rescale=True, resize=True; Diffusion Forcing
    feeds floats in [-1, 1] with rescale=False, resize=True; the equivalence check against tf.hub
    (universome/fvd-comparison) feeds [-1, 1] floats already at 224x224 with rescale=False,
    resize=False. We take that last, verified path and do the preprocessing here, in the open, as
    TECO's `fvd_preprocess` does: resize every frame to 224x224 bilinearly (half-pixel centres, no
    antialiasing, the aspect ratio not kept: tf.image.resize's default), then map [0, 1] to [-1, 1].

    videos: (B, T, H, W, 3), uint8 in [0, 255] or float in [0, 1], T >= 9. Returns (B, 400) float64.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no I3D TorchScript file here; FVD needs StyleGAN-V's i3d_torchscript.pt "
                "placed locally (minisora never downloads it)"
            )
        self.path = path
        self.device = torch.device(device)
        self.net = torch.jit.load(str(path), map_location=self.device).eval()

    def _preprocess(self, videos: Tensor) -> Tensor:
        """(b, T, H, W, 3) uint8 or [0, 1] float -> (b, 3, T, 224, 224) float32 in [-1, 1]."""
        if videos.dtype == torch.uint8:
            x = videos.float() / 255.0
        else:
            x = videos.float()
        b, t, h, w, _ = x.shape
        x = x.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w)  # (b, T, H, W, 3) -> (b*T, 3, H, W)
        if (h, w) != (I3D_RESOLUTION, I3D_RESOLUTION):
            size = (I3D_RESOLUTION, I3D_RESOLUTION)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = x.view(b, t, 3, I3D_RESOLUTION, I3D_RESOLUTION).transpose(1, 2)  # -> (b, 3, T, 224, 224)
        return (2.0 * x - 1.0).clamp(-1.0, 1.0).contiguous()  # clamp: float32 interpolation can overshoot by 1e-7

    @torch.no_grad()
    def __call__(self, videos: np.ndarray | Tensor, batch_size: int = 16) -> np.ndarray:
        v = torch.as_tensor(np.asarray(videos)) if not isinstance(videos, Tensor) else videos
        if v.ndim != 5 or v.shape[-1] != 3:
            raise ValueError(f"videos must be (B, T, H, W, 3), got {tuple(v.shape)}")
        if v.shape[1] < I3D_MIN_FRAMES:
            raise ValueError(f"the I3D needs at least {I3D_MIN_FRAMES} frames per video, got {v.shape[1]}")
        if v.dtype != torch.uint8:
            if not v.is_floating_point():
                raise ValueError(f"videos must be uint8 or float in [0, 1], got {v.dtype}")
            lo, hi = float(v.min()), float(v.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"float videos must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        feats = []
        for i in range(0, v.shape[0], batch_size):
            x = self._preprocess(v[i : i + batch_size].to(self.device))
            f = self.net(x, rescale=False, resize=False, return_features=True)  # (b, 400)
            if f.ndim != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"{self.path}: expected (batch, features) from the I3D, got {tuple(f.shape)}")
            feats.append(f.double().cpu().numpy())
        return np.concatenate(feats)


# ---------------------------------------------------------------------------------------------
# LPIPS


LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, which lpips.LPIPS(net="alex") loads


def lpips_available(path: str | Path | None = None) -> bool:
    """Whether LPIPS (AlexNet, TECO's choice) can run without a download.

    True only if the `lpips` and `torchvision` packages are installed, the LPIPS linear-layer
    weights are a local file (`path`, or the `weights/v0.1/alex.pth` that the lpips package ships),
    and torchvision's AlexNet backbone is already in the torch hub cache. Checks files only.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None or importlib.util.find_spec("torchvision") is None:
        return False
    lin = Path(path) if path is not None else Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE
    return lin.is_file() and backbone.is_file()


__all__ = [
    "I3DFeatures",
    "exact_repeat_share",
    "frame_errors",
    "frame_metrics",
    "frechet_distance",
    "fvd",
    "gaussian_stats",
    "gaussian_window",
    "horizon_curves",
    "lpips_available",
    "psnr_of_mean_mse",
    "psnr_per_frame",
    "ssim_per_frame",
    "summarize_seeds",
    "video_metrics",
]
