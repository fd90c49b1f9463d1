"""Long-short attention (VideoDiT short_frames > 0): the mask against its definition, the chunked SDPA path
against the dense masked one, teacher forcing against a chunk-1 rollout with the KV cache, the cache's bound,
and `minisora train --short-frames` end to end. Tolerances as tests/test_kvcache.py (float order only)."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from minisora import attention
from minisora.attention import LongShort, attend, dense, long_short_mask
from minisora.kv_cache import KVCache
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.vae import build_vae, tiny_vae_config

ATOL = 1e-4


def random_dit(short=3, pool=2, depth=2, num_actions=0, seed=0) -> VideoDiT:
    """A small causal DiT on 4x4 token grids (patch 1), all weights random."""
    torch.manual_seed(seed)
    dit = VideoDiT(in_channels=4, patch_size=1, hidden_size=32, depth=depth, num_heads=2, num_actions=num_actions,
                   attention="causal", short_frames=short, memory_pool=pool)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    return dit.eval()


def _reference(ls: LongShort) -> torch.Tensor:
    """The rule written out pair by pair: query frame i sees memory of frames <= i - short and full frames in
    (i - short, i]; a noisy query frame sees the clean copy's full frames in (i - short, i) and itself."""
    copies = 2 if ls.teacher_forcing else 1
    keys = [("mem", ls.memory_first + j, None) for j in range(ls.memory) for _ in range(ls.memory_tokens)]
    keys += [("full", ls.full_first + j, c) for c in range(copies) for j in range(ls.full) for _ in range(ls.tokens)]
    queries = [(i, c) for c in range(copies) for i in range(ls.queries) for _ in range(ls.tokens)]
    out = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    for a, (i, qc) in enumerate(queries):
        for b, (kind, j, kc) in enumerate(keys):
            if kind == "mem":
                out[a, b] = j <= i - ls.short
            elif not ls.teacher_forcing or qc == 0:
                out[a, b] = i - ls.short < j <= i and kc in (None, 0)
            else:
                out[a, b] = (kc == 0 and i - ls.short < j < i) or (kc == 1 and j == i)
    return out


LAYOUTS = {  # short, tokens, memory tokens, queries, memory first, memory, full first, full, teacher forcing
    "window": LongShort(3, 4, 1, 7, 0, 4, 0, 7),
    "teacher_forcing": LongShort(3, 4, 1, 6, 0, 3, 0, 6, True),
    "after_the_cache": LongShort(3, 4, 1, 2, -5, 4, -2, 4),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_mask_is_its_definition_and_the_chunked_path_equals_the_dense_one(name):
    ls = LAYOUTS[name]
    mask = long_short_mask(ls, "cpu", "sdpa", chunk_frames=2)
    assert torch.equal(dense(mask), _reference(ls))
    assert mask.chunks and all(c.keys is None or len(c.keys) < mask.kv_len for c in mask.chunks)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, mask.q_len, 8, generator=g)
    k, v = (torch.randn(2, 3, mask.kv_len, 8, generator=g) for _ in range(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense(mask))
    torch.testing.assert_close(attend(q, k, v, mask), ref, atol=1e-5, rtol=0)
    if attention.flex_available():  # the flex form is a BlockMask of the same rule
        flex = long_short_mask(ls, "cpu", "flex")
        assert flex.flex is not None and torch.equal(dense(flex), dense(mask))


def test_one_query_frame_after_the_cache_needs_no_mask():
    assert long_short_mask(LongShort(3, 4, 1, 1, -6, 4, -2, 3), "cpu", "sdpa") is None


def test_pool_1_is_plain_causal_attention_and_pool_2_is_not():
    plain = VideoDiT(in_channels=4, patch_size=1, hidden_size=32, depth=2, num_heads=2, attention="causal")
    plain.load_state_dict(random_dit(pool=1).state_dict())
    g = torch.Generator().manual_seed(0)
    x, clean, t = torch.randn(2, 7, 4, 4, 4, generator=g), torch.randn(2, 7, 4, 4, 4, generator=g), torch.rand(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(random_dit(pool=1)(x, t, clean=clean), plain(x, t, clean=clean), atol=ATOL, rtol=0)
        torch.testing.assert_close(random_dit(pool=1)(x, t), plain(x, t), atol=ATOL, rtol=0)
        assert (random_dit(pool=2)(x, t) - plain(x, t)).abs().amax() > 1e-2


@pytest.mark.parametrize("with_actions", [False, True])
def test_teacher_forcing_equals_a_chunk_1_rollout_with_the_cache(with_actions):
    """Noisy frame i of the teacher-forcing pass = frame i stepped against a cache of clean frames < i committed
    one by one: full keys of the last short - 1, memory of the older ones."""
    model = random_dit(short=3, pool=2, depth=3, num_actions=3 if with_actions else 0)
    g = torch.Generator().manual_seed(1)
    clean, noisy, t = torch.randn(2, 8, 4, 4, 4, generator=g), torch.randn(2, 8, 4, 4, 4, generator=g), torch.rand(2, 8)
    actions = torch.randint(0, 3, (2, 8), generator=g) if with_actions else None
    cache, steps = KVCache(len(model.blocks), position=5), []
    with torch.no_grad():
        v = model(noisy, t, actions, clean=clean)
        for i in range(8):
            act = None if actions is None else actions[:, i:i + 1]
            steps.append(model(noisy[:, i:i + 1], t[:, i:i + 1], act, kv_cache=cache))
            model(clean[:, i:i + 1], torch.zeros(2, 1), act, kv_cache=cache, update_cache=True)
            assert (cache.frames, cache.memory_frames) == (min(i + 1, 2), i + 1)  # the bound: short - 1 in full
        plain = model(torch.cat([clean[:, :5], noisy[:, 5:6]], 1), torch.cat([torch.zeros(2, 5), t[:, 5:6]], 1),
                      None if actions is None else actions[:, :6])
    torch.testing.assert_close(torch.cat(steps, 1), v, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain[:, -1], v[:, 5], atol=ATOL, rtol=0)  # and the plain pass agrees
    assert cache.keys[0].shape[2] == 2 * 16 and cache._memory[0].live()[0].shape[2] == 8 * 4


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae("kl", tiny_vae_config("kl"))


def test_rollouts_window_cache_equals_recompute_and_the_rolling_cache_stays_bounded(vae):
    pipe = DiTPipeline(random_dit(short=3, pool=2), vae.model, FlowMatchEulerDiscreteScheduler(shift=1.0),
                       window_frames=6, latent_size=[4, 4])
    pipe.set_progress_bar_config(disable=True)
    ctx = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    runs = {mode: pipe(context_latents=ctx, num_frames=14, num_inference_steps=3, chunk=2, kv_cache=mode,
                       generator=torch.Generator().manual_seed(0), output_type="latent").latents
            for mode in ("off", "window", "rolling")}
    torch.testing.assert_close(runs["window"], runs["off"], atol=ATOL, rtol=0)
    assert pipe.rollout_line("rolling") == ("causal attention, long-short (the last 3 frames in full, older ones "
                                            "pooled 2x2), KV cache (rolling)")
    torch.testing.assert_close(runs["rolling"][:, :6], runs["off"][:, :6], atol=ATOL, rtol=0)  # the first window
    model = pipe.transformer
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        for i in range(10):  # what a rolling rollout at window 6, chunk 1 keeps
            model(torch.randn(1, 1, 4, 4, 4), torch.zeros(1, 1), kv_cache=cache, update_cache=True)
            cache.keep_last(5)
    assert (cache.frames, cache.memory_frames, cache.position) == (2, 5, 10)


def test_settings_round_trip_old_configs_load_unchanged_and_bad_ones_are_refused(tmp_path):
    random_dit(short=4, pool=2).save_pretrained(tmp_path / "ls")
    cfg = VideoDiT.from_pretrained(tmp_path / "ls").config
    assert (cfg.short_frames, cfg.memory_pool) == (4, 2)
    random_dit(short=0).save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("short_frames", "memory_pool")}
    path.write_text(json.dumps(old))
    assert VideoDiT.from_pretrained(tmp_path / "old").config.short_frames == 0
    with pytest.raises(ValueError, match="short_frames 4 .* needs attention='causal'"):
        VideoDiT(attention="full", short_frames=4)
    with pytest.raises(ValueError, match="memory_pool 3 must divide the token grid 4x4"):
        random_dit(pool=3)(torch.randn(1, 5, 4, 4, 4), torch.rand(1, 5))


def test_train_short_frames_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from _store_helpers import make_store
    from cli.main import app

    make_store(tmp_path / "store", {"train": [10] * 2}, hw=(4, 4))
    def args(short, steps):
        return ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--frames", "8",
                "--short-frames", str(short), "--memory-pool", "2", "--patch-size", "1", "--batch-size", "2",
                "--steps", str(steps), "--warmup", "1", "--ckpt-every", "2", "--device", "cpu"]

    r = CliRunner().invoke(app, args(3, 2))
    assert r.exit_code == 0, r.output
    assert "long-short: the last 3 frames in full, older ones pooled 2x2" in r.output
    (saved,) = (tmp_path / "run").glob("checkpoints/*/pipeline/transformer")
    assert (VideoDiT.from_pretrained(saved).config.short_frames, VideoDiT.from_pretrained(saved).config.memory_pool) \
        == (3, 2)
    r = CliRunner().invoke(app, args(2, 4))  # resuming with another --short-frames is another run
    assert r.exit_code != 0 and "was trained with --short-frames 3; this run has --short-frames 2" in r.output
