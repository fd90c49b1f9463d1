"""minisora.plugins on CPU: refusals, clipping through the plugin's path on ddp (fp16 too), no_sync accumulation
on 2 gloo processes equal to one large batch, the loss-scaler state and ZeRO's first scale, a child process as a
world of its own, and t / RoPE precision in the model."""

import os

import pytest
import torch

from minisora import plugins
from minisora.contracts import CONTRACTS, contracts_help
from minisora.model import VideoDiT, apply_rope, rope_angles

CPU = torch.device("cpu")
SMALL = dict(in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2)


def test_combinations_that_cannot_work_are_refused():
    with pytest.raises(RuntimeError, match="--plugin zero2 needs CUDA GPUs.*use --plugin ddp"):
        plugins.check_combination("zero2", "bf16", CPU, 0.999)
    with pytest.raises(RuntimeError, match="--precision fp16 needs a CUDA GPU"):
        plugins.check_combination("ddp", "fp16", CPU, 0.999)
    cuda = torch.device("cuda", 0)  # only the rule is checked here; nothing touches a GPU
    with pytest.raises(RuntimeError, match="--plugin gemini cannot train in fp32.*use --precision bf16 or fp16"):
        plugins.check_combination("gemini", "fp32", cuda, 0.0)
    with pytest.raises(RuntimeError, match="--plugin gemini keeps no EMA.*--ema-decay 0"):
        plugins.check_combination("gemini", "bf16", cuda, 0.999)
    assert plugins.check_combination("gemini", "bf16", cuda, 0.0).clips_in_step
    with pytest.raises(ValueError, match="unknown plugin 'fsdp'; choose one of ddp, zero1, zero2, gemini"):
        plugins.check_combination("fsdp", "bf16", CPU, 0.9)


def test_every_contract_is_in_the_help_text():
    text = contracts_help()
    for c in CONTRACTS.values():
        for part in (c.precision, c.clip, c.accumulate, c.ema, c.checkpoint):
            assert part in text


def test_t_reaches_the_model_as_built():
    t = torch.tensor([[0.501, 0.2503]])
    assert torch.equal(plugins.time_as_seen(CONTRACTS["zero2"], "bf16", t), t)  # cast_inputs=False: fp32 kept
    seen = plugins.time_as_seen(CONTRACTS["gemini"], "bf16", t)  # Gemini casts inputs: x_t uses the rounded t
    assert seen.dtype == torch.float32 and seen[0, 0].item() == 0.5 and torch.equal(seen, t.bfloat16().float())


def test_conditioning_of_a_bf16_model_keeps_t_in_fp32():
    torch.manual_seed(0)
    model = VideoDiT(**SMALL).to(torch.bfloat16)
    torch.nn.init.normal_(model.time_embed.linear_1.weight, std=1.0)
    a = model.condition(torch.tensor([[0.501]]))
    b = model.condition(torch.tensor([[0.5]]))  # 0.501 rounds to 0.5 in bf16: the sinusoid must see the difference
    assert not torch.equal(a, b)


def test_compile_in_place_keeps_parameter_names():
    model = VideoDiT(**SMALL)
    names = [n for n, _ in model.named_parameters()]
    model.compile()  # what --compile does (lazy: nothing is compiled before the first forward)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == names
    assert not any(n.startswith("_orig_mod") for n in model.state_dict())


def test_rope_runs_in_the_input_dtype():
    a = rope_angles(2, 2, 2, 12)
    q = torch.randn(1, 2, 8, 12)
    ref = apply_rope(q, a.cos(), a.sin())
    out = apply_rope(q.bfloat16(), a.cos(), a.sin())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    assert torch.equal(apply_rope(q, a.cos(), a.sin()), ref)


def test_loss_scaler_state_round_trips():
    from colossalai.amp.naive_amp.grad_scaler import DynamicGradScaler

    def scaler(scale, growth_step, hysteresis_step):
        # DynamicGradScaler.__init__ asks the accelerator for a device count, which ColossalAI's CPU
        # accelerator refuses; the state the GPU run saves is these three fields
        s = DynamicGradScaler.__new__(DynamicGradScaler)
        s._scale, s._growth_step, s._hysteresis_step = torch.tensor([scale]), growth_step, hysteresis_step
        return s

    state = plugins.scaler_state(scaler(2.0**15, 7, 1))
    assert state == {"kind": "colossalai", "scale": 2.0**15, "growth_step": 7, "hysteresis_step": 1}
    fresh = scaler(2.0**16, 0, 0)
    plugins.load_scaler_state(fresh, state)
    assert fresh.scale.item() == 2**15 and plugins.scaler_state(fresh) == state

    t = torch.amp.GradScaler("cpu", init_scale=1024.0)
    t.scale(torch.ones(()))  # the scale tensor is created lazily
    t._scale.fill_(256.0)
    saved = plugins.scaler_state(t)
    assert saved["kind"] == "torch" and saved["scale"] == 256.0
    other = torch.amp.GradScaler("cpu")
    plugins.load_scaler_state(other, saved)
    assert other.get_scale() == 256.0
    assert plugins.scaler_state(None) is None


def _tiny_loss(model, seed, batch):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 4, 4, 4, generator=g)
    t = torch.rand(batch, 2, generator=g)
    target = torch.randn(x.shape, generator=g)
    return ((model(x, t) - target) ** 2).mean()


def _boosted(world_seed=0):
    torch.manual_seed(world_seed)
    model = VideoDiT(**SMALL)
    for p in model.parameters():  # open the adaLN-zero gates so every parameter gets a gradient
        torch.nn.init.normal_(p, std=0.2)
    c = CONTRACTS["ddp"]
    opt = plugins.build_optimizer(c, model, lr=1e-3, weight_decay=0.0)
    booster = plugins.build_booster(c, "fp32", grad_clip=0.0, grad_accum=2)
    model, opt, *_ = booster.boost(model, opt)
    return c, booster, model, opt


def test_clipping_goes_through_the_plugins_path_on_ddp():
    plugins.launch("cpu")
    c, booster, model, opt = _boosted()
    booster.backward(_tiny_loss(model, 0, 2) * 100, opt)
    params = [p for p in model.parameters() if p.grad is not None]
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    norm = plugins.clip_and_step(opt, c, max_norm=0.01)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert before > 1.0 and float(norm) == pytest.approx(float(before), rel=1e-5)  # the norm before clipping
    assert float(after) <= 0.01 * (1 + 1e-4)  # what step() used


def _accumulate_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    plugins.launch("cpu")
    c, booster, model, opt = _boosted()
    for micro in range(2):  # two micro-batches of 2 windows, the first without an all-reduce
        with plugins.micro_step(booster, model, opt, c, last=micro == 1):
            booster.backward(_tiny_loss(model, 100 * rank + micro, 2) / 2, opt)
        if micro == 0:
            first = [p.grad.clone() for p in model.parameters()]
    accumulated = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    parts = []  # the same 4 windows as one batch
    for gen in (torch.Generator().manual_seed(100 * rank + m) for m in range(2)):
        xi = torch.randn(2, 2, 4, 4, 4, generator=gen)
        parts.append((xi, torch.rand(2, 2, generator=gen), torch.randn(xi.shape, generator=gen)))
    x, t, target = (torch.cat(z) for z in zip(*parts))
    booster.backward(((model(x, t) - target) ** 2).mean(), opt)
    large = [p.grad.clone() for p in model.parameters()]
    torch.save({"first": first, "accumulated": accumulated, "large": large}, f"{out}/rank{rank}.pt")


def test_no_sync_accumulation_equals_one_large_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_accumulate_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the first micro-step did not all-reduce: each rank still holds its own gradient
    assert any(not torch.allclose(a, b) for a, b in zip(r0["first"], r1["first"]))
    for r in (r0, r1):  # accumulated (one all-reduce at the end) == one batch of 4 windows per rank
        for acc, big in zip(r["accumulated"], r["large"]):
            torch.testing.assert_close(acc, big, atol=1e-6, rtol=1e-5)
    for a, b in zip(r0["accumulated"], r1["accumulated"]):  # and synced across the ranks
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ issue 21
def _amp_optimizer(scale: float | None):
    """AdamW over two parameters in ColossalAI's fp16 wrapper for ddp. Its torch.cuda.amp.GradScaler is disabled
    without CUDA; `scale` swaps in an enabled CPU GradScaler, so that unscaling really happens (and may happen once)."""
    from colossalai.booster.mixed_precision.fp16_torch import TorchAMPOptimizer

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    opt = TorchAMPOptimizer(torch.optim.AdamW(params, lr=1e-3))
    if scale is not None:
        opt.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        opt.scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    factor = 1.0 if scale is None else scale
    grads = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])]  # norm 5 once unscaled
    for p, g in zip(params, grads):
        p.grad = g * factor  # what backward of the scaled loss leaves
    return opt, params


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_ddp_fp16_clipping_returns_the_unscaled_norm(scale):
    opt, params = _amp_optimizer(scale)
    norm = plugins.clip_and_step(opt, CONTRACTS["ddp"], max_norm=0.5)
    assert isinstance(norm, torch.Tensor) and float(norm) == pytest.approx(5.0, rel=1e-6)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad for p in params]))
    assert float(clipped) == pytest.approx(0.5, rel=1e-4)  # unscaled, then clipped, before step()
    assert all(float(p.abs().max()) > 0 for p in params)  # the step was taken (not skipped as an overflow)


def test_ddp_without_clipping_still_returns_the_norm():
    opt, params = _amp_optimizer(1024.0)
    norm = plugins.clip_and_step(opt, CONTRACTS["ddp"], max_norm=0.0)
    assert float(norm) == pytest.approx(5.0, rel=1e-6)
    assert float(torch.linalg.vector_norm(torch.cat([p.grad for p in params]))) == pytest.approx(5.0, rel=1e-6)


def test_zero_in_fp16_starts_at_torchs_loss_scale():
    plugins.launch("cpu")  # the plugins need a process group to be built (nothing is boosted here)
    for name in ("zero1", "zero2"):
        assert plugins.build_plugin(CONTRACTS[name], "fp16", 1.0, 1).zero_optim_kwargs["initial_scale"] == 2**16
    assert plugins.build_plugin(CONTRACTS["gemini"], "fp16", 1.0, 1).optim_kwargs["initial_scale"] == 2**16


def test_a_child_of_a_launched_process_is_a_world_of_its_own(tmp_path):
    """`launch` leaves RANK, MASTER_PORT, ... in os.environ; a `minisora train` child given them joins that
    (busy) port instead of making its own world of one. fresh_world_env drops exactly those variables."""
    import socket
    import subprocess
    import sys

    from _store_helpers import make_store

    store = tmp_path / "store"
    make_store(store, {"train": [8] * 4, "test": [8] * 2}, clips_per_shard=2, hw=(4, 4))
    cmd = [sys.executable, "-m", "cli.main", "train", "--store", str(store), "--frames", "4", "--batch-size", "2",
           "--steps", "1", "--device", "cpu"]
    with socket.socket() as busy:  # the parent's rendezvous port, still listening
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
        clean = plugins.fresh_world_env(env)
        assert set(env) - set(clean) == set(plugins.TORCHRUN_VARS) and all(clean[k] == env[k] for k in clean)
        raw = subprocess.run(cmd + ["--out", str(tmp_path / "raw")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert raw.returncode != 0 and "EADDRINUSE" in raw.stderr, raw.stdout + raw.stderr
        ok = subprocess.run(cmd + ["--out", str(tmp_path / "ok")], env=clean, capture_output=True, text=True,
                            timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "on cpu, plugin ddp" in ok.stdout and (tmp_path / "ok" / "metrics.jsonl").exists()
