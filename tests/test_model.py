"""The video DiT (minisora.model): shapes, adaLN-Zero, parameter counts, per-frame conditioning, RoPE,
actions, gradient checkpointing, save/load, and that it can fit one clip with the flow loss."""

import warnings

import pytest
import torch

from minisora.flow import FlowConfig, flow_loss, noisy, sample_times
from minisora.kv_cache import KVCache
from minisora.model import DIT_MODEL_SPECS, VideoDiT, apply_rope, count_params, rope_angles

TINY = dict(in_channels=4, hidden_size=32, depth=2, num_heads=2)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _model(seed=0, randomize=True, **kw):
    """A tiny model; `randomize` adds noise to every parameter so the zero-initialised paths are open."""
    torch.manual_seed(seed)
    model = VideoDiT(**{**TINY, **kw})
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("shape,pt", [((2, 1, 4, 8, 8), 1), ((1, 5, 4, 4, 12), 1), ((2, 6, 4, 6, 2), 1),
                                      ((1, 4, 4, 8, 4), 2)])
def test_output_shape(shape, pt):
    model = _model(patch_size_t=pt)
    out = model(_randn(*shape), torch.rand(shape[:2]))
    assert out.shape == shape and out.dtype == torch.float32 and out.abs().sum() > 0


def test_shape_errors_name_the_numbers():
    model = _model(patch_size_t=2)
    with pytest.raises(ValueError, match=r"\(T, H, W\) = \(3, 8, 8\).*\(2, 2, 2\)"):
        model(_randn(1, 3, 4, 8, 8), torch.rand(1, 3))
    with pytest.raises(ValueError, match=r"\(4, 8, 7\)"):
        model(_randn(1, 4, 4, 8, 7), torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"\(B, T, 4, H, W\), got \(1, 4, 3, 8, 8\)"):
        model(_randn(1, 4, 3, 8, 8), torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"timesteps \(1,\) must be \(B, T\) = \(1, 4\)"):
        model(_randn(1, 4, 4, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="num_actions=0"):
        model(_randn(1, 4, 4, 8, 8), torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        VideoDiT.from_preset("huge")


def test_zero_output_at_init():
    model = _model(randomize=False, num_actions=3)
    out = model(_randn(2, 3, 4, 8, 8), torch.rand(2, 3), torch.randint(0, 3, (2, 3)))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("preset,kw", [("tiny", {}), ("tiny", dict(num_actions=7)), ("small", dict(num_actions=5)),
                                       ("tiny", dict(in_channels=16, patch_size=1, patch_size_t=2))])
def test_count_params_matches_instantiated(preset, kw):
    model = VideoDiT.from_preset(preset, **kw)
    assert count_params(preset, **kw) == sum(p.numel() for p in model.parameters())


def test_presets_ordered_by_size():
    order = ["tiny", "small", "base", "large", "xl"]
    assert list(DIT_MODEL_SPECS) == order
    counts = [count_params(name) for name in order]
    assert counts == sorted(counts) and len(set(counts)) == 5
    assert 600e6 < count_params("xl") < 700e6  # DiT-XL/2 has 675M


def test_save_load_round_trip(tmp_path):
    model = _model(num_actions=4, patch_size_t=2, action_dropout=0.3)
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.num_actions == 4 and loaded.config.patch_size_t == 2 and loaded.config.action_dropout == 0.3
    x, t, a = _randn(2, 4, 4, 8, 8), torch.rand(2, 4), torch.randint(0, 4, (2, 4))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, a), model(x, t, a))


def test_conditioning_is_per_frame():
    # Close every attention branch (zero its gate rows in adaLN), so each frame's tokens only see
    # themselves; then frame i's output may depend on t_i only, and must equal what the whole clip
    # gives when every frame has t = t_i. Pooling c over frames, or using one frame's c for all, fails.
    model = _model(num_actions=3)
    d = TINY["hidden_size"]
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight[2 * d:3 * d] = 0  # gate_msa rows
            block.adaLN_modulation[-1].bias[2 * d:3 * d] = 0
    x, a = _randn(1, 4, 4, 8, 8), torch.tensor([[0, 2, 1, 2]])
    t = torch.tensor([[0.0, 0.3, 0.6, 0.9]])
    with torch.no_grad():
        out = model(x, t, a)
        for i in range(4):
            clip = model(x, t[:, i:i + 1].expand(1, 4), a)
            torch.testing.assert_close(out[:, i], clip[:, i], atol=1e-6, rtol=0)
            assert (out[:, i] - clip[:, (i + 1) % 4]).abs().max() > 1e-3  # the test can tell frames apart
        t2 = t.clone()
        t2[0, 2] = 0.1
        a2 = a.clone()
        a2[0, 1] = 0
        out_t, out_a = model(x, t2, a), model(x, t, a2)
    changed_t = (out_t - out).abs().amax(dim=(0, 2, 3, 4))  # (T,)
    changed_a = (out_a - out).abs().amax(dim=(0, 2, 3, 4))
    assert changed_t[2] > 1e-3 and changed_t[[0, 1, 3]].max() == 0
    assert changed_a[1] > 1e-3 and changed_a[[0, 2, 3]].max() == 0


def test_rope_scores_depend_only_on_relative_positions():
    head_dim, (T, H, W) = 16, (3, 2, 4)
    q, k = _randn(1, 1, T * H * W, head_dim, seed=1), _randn(1, 1, T * H * W, head_dim, seed=2)

    def scores(offset):
        a = rope_angles(T, H, W, head_dim, frame_offset=offset)
        return apply_rope(q, a.cos(), a.sin()) @ apply_rope(k, a.cos(), a.sin()).transpose(-1, -2)

    torch.testing.assert_close(scores(0.0), scores(37.0), atol=1e-4, rtol=1e-5)
    assert (scores(0.0) - q @ k.transpose(-1, -2)).abs().max() > 0.1  # it does rotate
    a = rope_angles(T, H, W, head_dim)
    assert a.shape == (T * H * W, head_dim // 2) and torch.equal(a[0], torch.zeros(head_dim // 2))
    # rotations keep norms
    torch.testing.assert_close(apply_rope(q, a.cos(), a.sin()).norm(dim=-1), q.norm(dim=-1))


def test_model_knows_frame_and_pixel_order():
    # Full attention without positions would be equivariant to any token permutation; with 3D RoPE
    # reversing the frames (or the rows) of the input must not just reverse the output.
    model = _model()
    x, t = _randn(1, 4, 4, 8, 8), torch.full((1, 4), 0.5)
    with torch.no_grad():
        out = model(x, t)
        assert (model(x.flip(1), t).flip(1) - out).abs().max() > 1e-3
        assert (model(x.flip(3), t).flip(3) - out).abs().max() > 1e-3


def test_actions_matter_after_training_steps():
    model = _model(randomize=False, num_actions=4, action_dropout=0.0).train()
    x, t, a = _randn(2, 3, 4, 8, 8), torch.rand(2, 3), torch.randint(0, 4, (2, 3))
    with torch.no_grad():
        assert torch.equal(model(x, t, a), model(x, t))  # both zero at init
    # step 1 only moves the output layer (the adaLN weights get zero gradient while it is zero);
    # from step 2 on the conditioning, and with it the action, reaches the output
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    e = _randn(2, 3, 4, 8, 8, seed=5)
    for _ in range(3):
        opt.zero_grad()
        flow_loss(model(noisy(x, e, t), t, a), x, e).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x, t)
        assert (model(x, t, a) - out).abs().max() > 1e-3 * out.abs().max()  # far above float error
        # negative actions (the store's "no action") are the null action
        assert torch.equal(model(x, t, torch.full((2, 3), -1)), model(x, t))


def test_action_dropout_in_train_mode_only():
    x, t, a = _randn(2, 3, 4, 8, 8), torch.rand(2, 3), torch.randint(0, 4, (2, 3))
    model = _model(num_actions=4, action_dropout=1.0)
    with torch.no_grad():
        null_out = model(x, t)
        assert (model(x, t, a) - null_out).abs().max() > 1e-3  # eval: actions are used
        model.train()
        assert torch.equal(model(x, t, a), null_out)  # train with p=1: all dropped
    # p = 0.5: each sample's actions are dropped as a whole, about half of the samples
    model = _model(num_actions=4, action_dropout=0.5).train()
    torch.manual_seed(0)
    t, a = torch.zeros(1000, 2), torch.tensor([[0, 1]]).expand(1000, 2)
    with torch.no_grad():
        c = model.condition(t, a)  # (1000, 2, D)
        model.eval()
        ref_null, ref_kept = model.condition(t[:1]), model.condition(t[:1], a[:1])  # (1, 2, D)
    assert (ref_null - ref_kept).abs().min() > 0
    is_null = (c - ref_null).abs().amax(dim=2) < 1e-6  # (1000, 2)
    is_kept = (c - ref_kept).abs().amax(dim=2) < 1e-6
    assert (is_null ^ is_kept).all()  # every frame is exactly one of the two
    assert torch.equal(is_null[:, 0], is_null[:, 1])  # both frames of a sample go together
    assert abs(is_null[:, 0].sum().item() - 500) < 80  # binomial sd 16


@pytest.mark.parametrize("attention", ["full", "causal"])
def test_gradient_checkpointing_gives_same_gradients(attention):
    x, t, e = _randn(2, 3, 4, 8, 8), torch.rand(2, 3), _randn(2, 3, 4, 8, 8, seed=3)

    def grads(model):
        model.train()
        flow_loss(model(noisy(x, e, t), t), x, e).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = _model(attention=attention)
    ckpt = _model(attention=attention)
    ckpt.enable_gradient_checkpointing()
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    g_plain, g_ckpt = grads(plain), grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert sum(g.abs().sum() for g in g_plain.values()) > 0


def test_tiny_model_overfits_one_clip():
    # The flow loss on a single clip can reach zero: the best velocity is (x_t - x*) / t (see
    # test_flow). 4 frames of 4x4 latents keep it fast; 8x8 latents need ~2x the steps.
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, hidden_size=64, depth=2, num_heads=2).train()
    x0 = _randn(1, 4, 4, 4, 4, seed=11).expand(16, -1, -1, -1, -1)
    steps, cfg = 300, FlowConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        t, context = sample_times(16, 4, cfg, generator=g)
        e = torch.randn(x0.shape, generator=g)
        loss = flow_loss(model(noisy(x0, e, t), t), x0, e, context)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-30:]) / 30
    assert last < first / 10, (first, last)


def test_cli_preset_help_matches_computed_counts():
    """cli/train.py lists the presets without importing diffusers; its numbers must match count_params."""
    import re

    from cli.train import _PRESETS
    from minisora.model import DIT_MODEL_SPECS, count_params

    listed = dict(re.findall(r"(\w+) \(([\d.]+)M", _PRESETS))
    assert set(listed) == set(DIT_MODEL_SPECS)
    for name, millions in listed.items():
        assert float(millions) == round(count_params(name) / 1e6, 1)


def test_forward_picks_the_pass_its_arguments_name():
    model = _model(num_actions=3, attention="causal")
    x, t, a = _randn(2, 4, 4, 8, 8), torch.rand(2, 4), torch.randint(0, 3, (2, 4))
    clean, t_clean = _randn(2, 4, 4, 8, 8, seed=1), torch.rand(2, 4)
    with torch.no_grad():
        assert torch.equal(model(x, t, a), model.forward_plain(x, t, a))
        assert torch.equal(model(x, t, a, clean=clean, clean_timesteps=t_clean),
                           model.forward_teacher_forcing(x, t, clean, a, t_clean))
        caches = [KVCache(2, position=3), KVCache(2, position=3)]
        for cache in caches:
            model(clean[:, :2], torch.zeros(2, 2), a[:, :2], kv_cache=cache, update_cache=True)
        via_forward = model(x[:, 2:], t[:, 2:], a[:, 2:], kv_cache=caches[0])
        assert torch.equal(via_forward, model.forward_cached(x[:, 2:], t[:, 2:], caches[1], a[:, 2:]))
    assert caches[0].frames == 2 and caches[0].position == 5  # only update_cache=True advanced it


def test_each_pass_checks_its_own_arguments():
    causal, full = _model(attention="causal"), _model()
    x, t = _randn(1, 3, 4, 8, 8), torch.rand(1, 3)
    with pytest.raises(ValueError, match=r"teacher forcing \(clean=...\) runs without a kv_cache"):
        causal(x, t, clean=x, kv_cache=KVCache(2))
    with pytest.raises(ValueError, match="clean_timesteps are the times of a clean copy"):
        causal(x, t, clean_timesteps=t)
    with pytest.raises(ValueError, match=r"clean_timesteps \(1, 2\) must be \(B, T\) of the clean copy \(1, 3\)"):
        causal(x, t, clean=x, clean_timesteps=t[:, :2])
    with pytest.raises(ValueError, match="update_cache=True needs a kv_cache"):
        causal(x, t, update_cache=True)
    with pytest.raises(ValueError, match="KV cache needs a causal model; this one has attention='full'"):
        full.forward_cached(x, t, KVCache(2))
    with pytest.raises(ValueError, match=r"timesteps \(1, 2\) must be \(B, T\) = \(1, 3\)"):
        causal.forward_teacher_forcing(x, t[:, :2], x)


def test_a_cached_pass_with_gradients_and_checkpointing_stores_each_frame_once():
    # a checkpointed block is recomputed in backward, which would store its keys again: cached passes run unchecked
    x, t = _randn(1, 3, 4, 8, 8), torch.rand(1, 3)
    outs, caches = [], []
    for ckpt in (False, True):
        model = _model(attention="causal").train()
        if ckpt:
            model.enable_gradient_checkpointing()
        cache = KVCache(2)
        v = model(x, t, kv_cache=cache, update_cache=True)
        v.square().mean().backward()
        outs.append(v.detach())
        caches.append(cache)
    assert torch.equal(outs[0], outs[1])
    assert [tuple(c.keys[0].shape) for c in caches] == [(1, 2, 3 * 16, 16)] * 2  # 3 frames of 4x4 tokens, once
    assert torch.equal(caches[0].keys[1], caches[1].keys[1])


def test_the_q_k_norms_run_in_the_weights_dtype_without_warnings():
    # CPU autocast hands the norms bf16 q, k; against fp32 weights torch.rms_norm warns "Mismatch dtype" and runs
    # unfused; fed fp32 it gives the same bits (computed in fp32, rounded to bf16 once)
    seen = []
    model = _model(attention="causal")
    model.blocks[0].attn.q_norm.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x, t = _randn(1, 2, 4, 8, 8), torch.rand(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(x, t, clean=x)
        model.to(torch.bfloat16)
        with torch.no_grad():
            v16 = model(x, t)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    assert v.dtype == v16.dtype == torch.bfloat16 and torch.isfinite(v).all() and torch.isfinite(v16).all()
    q = _randn(2, 3, 40, 16).bfloat16()
    weight = 1 + 0.1 * _randn(16, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mixed call the norms got before: bf16 input, fp32 weight
        mixed = torch.nn.functional.rms_norm(q, (16,), weight, 1e-6)
    assert torch.equal(torch.nn.functional.rms_norm(q.float(), (16,), weight, 1e-6).bfloat16(), mixed)
