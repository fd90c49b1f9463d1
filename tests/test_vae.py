"""VAE wrapper (tiny AutoencoderKL / AutoencoderTiny / AutoencoderKLWan from configs) and `minisora vae`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from minisora.vae import (VAEError, VideoVAE, build_vae, frames_to_pixels, pixels_to_frames,
                          tiny_vae_config)

REPO = Path(__file__).resolve().parents[1]
KINDS = {"kl": ("AutoencoderKL", 1, 4), "tiny": ("AutoencoderTiny", 1, 4), "wan": ("AutoencoderKLWan", 4, 4)}


def _vae(kind: str, seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    return build_vae(kind, tiny_vae_config(kind, latent_channels=4, downsample=4))


def _pixels(b: int, t: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------- frames <-> pixels
def test_frames_pixels_round_trip_is_exact_on_every_uint8_value():
    frames = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)  # (T=1, 16, 16, 3), all values
    pixels = frames_to_pixels(frames)
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min().item() == -1.0 and pixels.max().item() == 1.0
    assert pixels[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    back = pixels_to_frames(pixels)
    assert back.dtype == np.uint8 and np.array_equal(back, frames)
    assert np.array_equal(pixels_to_frames(torch.full((3, 2, 2), 7.0))[0, 0], [255, 255, 255])  # clamped
    with pytest.raises(ValueError, match=r"uint8 \(\.\.\., H, W, 3\), got torch.float32"):
        frames_to_pixels(np.zeros((2, 4, 4, 3), np.float32))


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", list(KINDS))
def test_encode_decode_shapes_and_info(kind):
    vae = _vae(kind)
    class_name, tc, sc = KINDS[kind]
    assert (vae.info.class_name, vae.info.temporal_compression, vae.info.spatial_compression) == (class_name, tc, sc)
    assert vae.info.deterministic == (kind == "tiny") and vae.info.latent_channels == 4
    t = 9 if tc > 1 else 3  # Wan: 1 + 4 * 2 frames -> 3 latent frames; image VAEs: one latent per frame
    mean, logvar = vae.encode(_pixels(2, t))
    assert mean.shape == (2, 3, 4, 4, 4) and mean.dtype == torch.float32
    assert logvar is None if kind == "tiny" else logvar.shape == mean.shape
    pixels = vae.decode(mean)
    assert pixels.shape == (2, t, 3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.abs().max().item() <= 1.0


def test_frame_counts():
    wan, kl = _vae("wan"), _vae("kl")
    assert [wan.latent_frames(t) for t in (1, 4, 5, 8, 9, 300)] == [1, 1, 2, 2, 3, 75]
    assert [wan.usable_frames(t) for t in (1, 4, 5, 8, 9, 300)] == [1, 1, 5, 5, 9, 297]
    assert [kl.latent_frames(t) for t in (1, 7, 300)] == [1, 7, 300] and kl.usable_frames(7) == 7
    assert [wan.pixel_frames(n) for n in (0, 1, 2, 75)] == [0, 1, 5, 297] and kl.pixel_frames(7) == 7
    assert wan.decode(wan.encode(_pixels(1, 5))[0]).shape[1] == 5
    with pytest.raises(VAEError, match=r"1 \+ 4k frames, got 8; use the first usable_frames\(8\) = 5"):
        wan.encode(_pixels(1, 8))
    with pytest.raises(VAEError, match="frame size 18x16 is not divisible by its spatial compression 4"):
        kl.encode(torch.zeros(1, 1, 3, 18, 16))


def test_image_vae_encodes_each_frame_on_its_own_and_wan_is_causal():
    kl, wan = _vae("kl"), _vae("wan")
    x = _pixels(2, 3)
    mean, logvar = kl.encode(x)
    alone, alone_lv = kl.encode(x[1:2, 2:3])  # batch 1, frame 2
    torch.testing.assert_close(mean[1, 2], alone[0, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar[1, 2], alone_lv[0, 0], rtol=1e-4, atol=1e-5)
    x = _pixels(1, 9, seed=1)
    full, _ = wan.encode(x)
    head, _ = wan.encode(x[:, :5])  # latent frames 0..1 see only frames 0..4
    torch.testing.assert_close(full[:, :2], head)
    torch.testing.assert_close(wan.decode(full)[:, :5], wan.decode(full[:, :2]))


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", list(KINDS))
def test_load_from_save_pretrained_gives_same_encodings(tmp_path, kind):
    vae = _vae(kind, seed=3)
    vae.model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VideoVAE.load(str(tmp_path / "m"))
    assert type(loaded.model).__name__ == KINDS[kind][0]  # class read from config.json
    assert loaded.info.source == str((tmp_path / "m").resolve())
    x = _pixels(1, 5 if kind == "wan" else 2, seed=4)
    (m0, lv0), (m1, lv1) = vae.encode(x), loaded.encode(x)
    torch.testing.assert_close(m0, m1, rtol=0, atol=0)
    if lv0 is not None:
        torch.testing.assert_close(lv0, lv1, rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(m0), loaded.decode(m0), rtol=0, atol=0)


def test_load_subfolder_and_bad_directories(tmp_path):
    vae = _vae("tiny")
    vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = VideoVAE.load(str(tmp_path / "pipe"), subfolder="vae")
    assert (loaded.info.class_name, loaded.info.subfolder) == ("AutoencoderTiny", "vae")
    shown = CliRunner().invoke(app, ["vae", "info", str(tmp_path / "pipe"), "--vae-subfolder", "vae"])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert (record["class_name"], record["subfolder"], record["deterministic"]) == ("AutoencoderTiny", "vae", True)
    assert record["parameters"] == sum(p.numel() for p in vae.model.parameters())
    with pytest.raises(VAEError, match=r"pipe/config.json: no config.json.*pass subfolder .vae., --vae-subfolder vae"):
        VideoVAE.load(str(tmp_path / "pipe"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(VAEError, match="_class_name='UNet2DModel'; supported: AutoencoderKL, AutoencoderTiny, "
                                       "AutoencoderKLWan"):
        VideoVAE.load(str(tmp_path / "unet"))
    vae.model.save_pretrained(tmp_path / "pickled", safe_serialization=False)  # .bin weights: refused
    with pytest.raises(VAEError, match="cannot load AutoencoderTiny from it \\(weights must be safetensors\\)"):
        VideoVAE.load(str(tmp_path / "pickled"))
    with pytest.raises(VAEError, match="no such directory, and not a Hub id"):
        VideoVAE.load(str(tmp_path / "missing"))


def test_offline_hub_id_says_so_and_asks_for_a_local_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "vae", "info", "made-up-org/no-such-vae",
                           "--subfolder", "vae"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "made-up-org/no-such-vae (subfolder='vae'): cannot reach the Hugging Face Hub" in err
    assert "Pass a local diffusers model directory instead" in err


# ---------------------------------------------------------------------------- vae train
def _square_clip(rng: np.random.Generator, t: int) -> np.ndarray:
    """64x64 frames: a white and a red square at random places on dark grey."""
    frames = np.full((t, 64, 64, 3), 40, np.uint8)
    for i in range(t):
        y, x = rng.integers(0, 64 - 24, 2)
        frames[i, y:y + 24, x:x + 24] = (255, 255, 255)
        y, x = rng.integers(0, 64 - 16, 2)
        frames[i, y:y + 16, x:x + 16] = (230, 40, 40)
    return frames


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _square_manifest(tmp_path: Path) -> Path:
    from minisora.data.manifest import build_manifest

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for j in range(n):
            path = tmp_path / "data" / split / "0000" / f"{j:05d}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, video=_square_clip(rng, 12), actions=rng.integers(0, 6, 12))
    manifest, _ = build_manifest(tmp_path / "data", "dmlab")
    manifest.save(tmp_path / "m.json")
    return tmp_path / "m.json"


def test_vae_train_cli_beats_the_mean_frame_and_writes_a_loadable_model(tmp_path):
    _square_manifest(tmp_path)
    out = tmp_path / "vae"
    args = ["vae", "train", "--manifest", str(tmp_path / "m.json"), "--out", str(out), "--steps", "30",
            "--batch-size", "8", "--width", "8", "--eval-every", "30", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {"config.json", "diffusion_pytorch_model.safetensors", "train_info.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "train_info.json").read_text())
    vae = VideoVAE.load(str(out))
    assert (vae.info.class_name, vae.info.spatial_compression, vae.info.latent_channels) == ("AutoencoderKL", 4, 4)
    assert info["steps"] == 30 and info["parameters"] == sum(p.numel() for p in vae.model.parameters())

    # recompute the held-out PSNR from the files, and the best constant frame's PSNR
    test = np.concatenate([np.load(p, allow_pickle=False)["video"]
                           for p in sorted((tmp_path / "data" / "test").rglob("*.npz"))])
    mean, _ = vae.encode(frames_to_pixels(test)[None])
    ours = _psnr(test, pixels_to_frames(vae.decode(mean)[0]))
    baseline = _psnr(test, np.broadcast_to(test.mean(0), test.shape))
    assert info["eval_frames"] == len(test) == 24
    assert info["test_psnr"] == pytest.approx(ours, abs=0.01)
    assert info["mean_frame_baseline_psnr"] == pytest.approx(baseline, abs=1e-6)
    assert ours > baseline + 0.5, (ours, baseline)
    assert f"test PSNR {info['test_psnr']:.2f} dB" in result.output

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already holds a model (config.json); pass --overwrite" in again.output


# ---------------------------------------------------------------------------- identity (issue 12)
def test_weights_digest_names_the_weights_not_the_dtype_or_the_path(tmp_path):
    from minisora.vae import weights_sha256

    a, b = _vae("kl", seed=0), _vae("kl", seed=1)
    a.model.save_pretrained(tmp_path / "a")
    (tmp_path / "copy").mkdir()
    for f in (tmp_path / "a").iterdir():
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    fp32 = VideoVAE.load(str(tmp_path / "a"))
    bf16 = VideoVAE.load(str(tmp_path / "copy"), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16  # computes in bf16, named by its stored weights
    assert fp32.info.weights_sha256 == bf16.info.weights_sha256 == weights_sha256(a.model) == a.identity()
    assert len(fp32.info.weights_sha256) == 64 and fp32.info.config_sha256 == bf16.info.config_sha256
    assert b.identity() != a.identity() and b.info.config_sha256 == a.info.config_sha256  # same config, other weights
    with torch.no_grad():
        next(a.model.parameters()).view(-1)[0] += 1e-3
    assert weights_sha256(a.model) != fp32.info.weights_sha256


@pytest.mark.parametrize("source,local", [("stabilityai/sd-vae-ft-ema", False), ("./vae", True), ("/abs/vae", True),
                                          ("~/vae", True), ("a/b/c", True), ("{tmp}/vae", True), ("{rel}/vae", True)])
def test_local_looking_sources_never_reach_the_hub(tmp_path, source, local):
    import time

    from minisora.vae import looks_local, read_vae_config

    source = source.format(tmp=tmp_path, rel=os.path.relpath(tmp_path))
    assert looks_local(source) is local
    if local:
        t0 = time.perf_counter()
        with pytest.raises(VAEError, match="no such directory, and not a Hub id .*the Hub is not asked"):
            read_vae_config(source)
        assert time.perf_counter() - t0 < 1.0

def test_vae_train_channels_last_is_the_same_model_and_the_precision_is_printed_and_recorded(tmp_path):
    manifest = _square_manifest(tmp_path)
    models = {}
    for layout in ("--channels-last", "--no-channels-last"):
        out = tmp_path / layout.strip("-")
        args = ["vae", "train", "--manifest", str(manifest), "--out", str(out), "--steps", "3", "--width", "8",
                "--device", "cpu", "--precision", "fp32", layout]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "precision fp32: asked for on CPU capability" in result.output
        info = json.loads((out / "train_info.json").read_text())
        assert info["precision"] == "fp32" and info["steps"] == 3
        assert info["config"]["channels_last"] == (layout == "--channels-last")
        models[layout] = VideoVAE.load(str(out))
    x = _pixels(1, 2, size=64, seed=5)
    (m0, _), (m1, _) = models["--channels-last"].encode(x), models["--no-channels-last"].encode(x)
    torch.manual_seed(0)  # the untrained model both runs started from (vae train seeds torch, then builds)
    (start, _) = build_vae("kl", tiny_vae_config("kl", 4, 4, 8)).encode(x)
    moved, apart = (m0 - start).abs().max().item(), (m0 - m1).abs().max().item()
    assert moved > 0.01 and apart < 0.1 * moved, (apart, moved)  # a memory layout (rounding order), not another model

    auto = CliRunner().invoke(app, ["vae", "train", "--manifest", str(manifest), "--out", str(tmp_path / "auto"),
                                    "--steps", "1", "--width", "8", "--device", "cpu"])
    assert auto.exit_code == 0, auto.output
    line = re.search(r"precision (fp32|bf16): auto: CPU capability \S+", auto.output)
    assert line, auto.output  # auto is the default; it says what it picked and why
    assert json.loads((tmp_path / "auto" / "train_info.json").read_text())["precision"] == line.group(1)
    bad = CliRunner().invoke(app, ["vae", "train", "--manifest", str(manifest), "--out", str(tmp_path / "bad"),
                                   "--steps", "1", "--precision", "fp64"])
    assert bad.exit_code == 1 and "unknown precision 'fp64'; choose one of auto, fp32, bf16, fp16" in bad.output


def test_tiny_vae_config_first_width_narrows_only_the_full_resolution_level():
    assert tiny_vae_config("kl", 4, 4, 16)["block_out_channels"] == [16, 32, 64]
    assert tiny_vae_config("kl", 4, 4, 16, first_width=8)["block_out_channels"] == [8, 32, 64]
    assert tiny_vae_config("kl", 4, 8, 16, first_width=8)["block_out_channels"] == [8, 32, 64, 64]
    with pytest.raises(ValueError, match="first_width must be a positive multiple of 8, got 12"):
        tiny_vae_config("kl", 4, 4, 16, first_width=12)
