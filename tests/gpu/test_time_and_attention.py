"""On CUDA: the per-frame time reaches the model as x_t was built with it, and SDPA takes a fused kernel."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("plugin", ["ddp", "zero1", "zero2", "gemini"])
def test_t_reaches_the_model_as_x_t_was_built(gpu_store, tmp_path, plugin):
    from minisora import plugins
    from stages.train import TrainConfig, build_run

    cfg = TrainConfig(store=gpu_store, out=str(tmp_path), frames=4, batch_size=2, plugin=plugin, precision="bf16",
                      compile=False, device="cuda", ema_decay=0.0)
    device = plugins.launch("cuda")
    contract = plugins.check_combination(plugin, "bf16", device, cfg.ema_decay)
    run = build_run(cfg, contract, "bf16", device)
    got = {}
    run.module.register_forward_pre_hook(lambda m, args: got.update(t=args[1].detach().clone()))
    t = torch.full((2, 4), 0.501, device=device)  # 0.501 is 0.5 in bf16
    seen = plugins.time_as_seen(contract, "bf16", t)
    x = torch.randn(2, 4, 4, 8, 8, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=plugins.autocast_dtype(contract, "bf16") is not None):
        run.model(x, seen)
    assert torch.equal(got["t"].float(), seen)  # what x_t was built from is what the model is told
    if plugin != "gemini":
        assert got["t"].dtype == torch.float32 and torch.equal(got["t"], t)  # unrounded


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_sdpa_uses_a_fused_kernel_not_the_math_path(preset):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minisora.model import VideoDiT

    model = VideoDiT.from_preset(preset, in_channels=4, patch_size=2).cuda().to(torch.bfloat16)
    x = torch.randn(2, 8, 4, 16, 16, device="cuda")
    t = torch.rand(2, 8, device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # raises if only math fits
        v = model(x, t)
        v.float().square().mean().backward()
    assert torch.isfinite(v).all()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x, t)
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert "flash" in names or "efficient" in names or "fmha" in names, names[:2000]
