"""Stage one, sampling and eval on CUDA: encode matches the CPU store, `vae train` runs, sample/eval in bf16.

Tolerances: the tiny VAE's posterior means from a CUDA encode must match the CPU encode's within 1e-2
absolute in fp32 (TF32 convolutions) and 0.1 absolute in bf16 (8 significant bits on values of order 1);
both stores hold fp16, whose own step near 1 is about 1e-3.
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cpu_store(clips):
    from stages.encode import EncodeConfig, main as encode

    out = clips / "store-cpu"
    encode(EncodeConfig(manifest=str(clips / "manifest.json"), vae=str(clips / "vae"), out=str(out), size=16,
                        clips_per_shard=2, device="cpu", progress=False))
    return out


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-2), ("bf16", 0.1)])
def test_encode_on_cuda_matches_the_cpu_store(clips, cpu_store, tmp_path, dtype, atol):
    from minisora.store import LatentStore
    from stages.encode import EncodeConfig, main as encode

    out = tmp_path / f"store-{dtype}"
    encode(EncodeConfig(manifest=str(clips / "manifest.json"), vae=str(clips / "vae"), out=str(out), size=16,
                        clips_per_shard=2, device="cuda", dtype=dtype, progress=False))
    a, b = LatentStore(str(cpu_store)), LatentStore(str(out))
    for split in ("train", "test"):
        ma = a.array(split, "mean")[:].astype(np.float32)
        mb = b.array(split, "mean")[:].astype(np.float32)
        ok = ~np.isnan(ma)
        assert np.array_equal(ok, ~np.isnan(mb))  # the same frames are padding
        assert np.abs(ma[ok] - mb[ok]).max() <= atol, (split, float(np.abs(ma[ok] - mb[ok]).max()))


def test_vae_train_runs_on_cuda(clips, tmp_path):
    from stages.vae_train import VAETrainConfig, main as vae_train

    vae_train(VAETrainConfig(manifest=str(clips / "manifest.json"), out=str(tmp_path / "vae"), steps=5,
                             batch_size=4, eval_every=5, eval_frames=8, device="cuda"))
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL"
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()


def test_sample_and_eval_in_bf16_on_cuda(clips, cpu_store, tmp_path):
    from stages.train import TrainConfig, main as train

    run = tmp_path / "run"
    train(TrainConfig(store=str(cpu_store), out=str(run), frames=4, batch_size=2, steps=4, warmup=1, ckpt_every=4,
                      precision="bf16", compile=False, device="cuda", use_actions=True))
    r = CliRunner().invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "samples"),
                                 "--frames", "8", "--steps", "4", "--device", "cuda",
                                 "--context", f"{cpu_store}:test:0", "--context-frames", "2"])
    assert r.exit_code == 0, r.output
    assert list(tmp_path.glob("samples*.mp4")) and list(tmp_path.glob("samples*.gif"))  # next to --out's stem
    report = tmp_path / "report.json"
    r = CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--store", str(cpu_store), "--out", str(report),
                                 "--context-frames", "2", "--frames", "8", "--num-clips", "1", "--seeds", "1",
                                 "--steps", "4", "--device", "cuda"])
    assert r.exit_code == 0, r.output
    text = report.read_text()
    assert "psnr" in text.lower() and "nan" not in text.lower()
    assert torch.cuda.is_bf16_supported()  # so sampling ran in bf16 (minisora.run_dir.sampling_dtype)
