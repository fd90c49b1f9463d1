"""The fixed-shape rolling cache (`KVRing`) and the compiled rollout passes (`DiTPipeline(..., compile=True)`,
`VideoDiT.compile_rollout`): the same frames as the growing `KVCache`, frame for frame and through the pipeline,
one compile per pass and shape, and clear refusals where compiling cannot apply.

Tolerance: the ring changes the order of the keys (attention sums them in another order) and compile fuses the
element-wise work, so latents agree to ATOL = 1e-4 (tests/test_kvcache.py's bound); a wrong slot, position or
mask is 1e-2 or more.
"""

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from diffusers import FlowMatchEulerDiscreteScheduler

from minisora.flow import euler_sample, time_grid
from minisora.kv_cache import KVCache, KVRing
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.vae import build_vae, tiny_vae_config

ATOL = 1e-4
WINDOW = 4


def random_dit(attention="causal", short_frames=0) -> VideoDiT:
    torch.manual_seed(0)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, num_actions=3, attention=attention,
                   short_frames=short_frames)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)  # a fresh adaLN-Zero DiT would predict v = 0
    return dit.eval()


def make_pipe(attention="causal", short_frames=0) -> DiTPipeline:
    torch.manual_seed(0)
    vae = build_vae("kl", tiny_vae_config("kl"))
    pipe = DiTPipeline(random_dit(attention, short_frames), vae.model, FlowMatchEulerDiscreteScheduler(shift=1.0),
                       window_frames=WINDOW, latent_size=[4, 4])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rollout(pipe, frames=3 * WINDOW + 2, chunk=1, compile=False, guidance=2.5):
    actions = torch.randint(0, 3, (1, frames), generator=torch.Generator().manual_seed(2))
    return pipe(context_latents=torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1)),
                num_frames=frames, num_inference_steps=3, actions=actions, guidance=guidance, chunk=chunk,
                generator=torch.Generator().manual_seed(0), output_type="latent", progress=False, compile=compile)


def test_a_ring_gives_the_rolling_caches_velocities_and_keys_frame_for_frame():
    """Euler-step passes and commits on a KVRing, eagerly, against the growing KVCache rolled with keep_last, for
    more frames than the ring has slots (so every slot is reused)."""
    model = random_dit()
    x = torch.randn(1, 3 * WINDOW, 4, 4, 4)
    cache = KVCache(2, position=5)
    with torch.no_grad():
        model.commit(x[:, :WINDOW - 1], torch.zeros(1, WINDOW - 1), cache)
        ring = KVRing(cache, WINDOW)
        assert (ring.frames, ring.position, ring.tokens, ring.k[0].shape[2]) == (WINDOW - 1, 8, 4, WINDOW * 4)
        for i in range(WINDOW - 1, 3 * WINDOW):
            frame, t = x[:, i:i + 1], torch.full((1, 1), 0.6)
            torch.testing.assert_close(model(frame, t, kv_cache=ring), model(frame, t, kv_cache=cache),
                                       rtol=0, atol=ATOL)
            model.commit(frame, torch.zeros(1, 1), ring)
            model.commit(frame, torch.zeros(1, 1), cache)
            cache.keep_last(WINDOW - 1)
            ring.keep_last(WINDOW - 1)
            assert ring.position == cache.position
        for layer in range(2):  # the ring holds the cache's keys, in ring order: the spare slot left out, sorted
            spare = set(ring.slot.tolist())
            kept = torch.tensor([j for j in range(WINDOW * 4) if j not in spare])
            order = (kept // 4 - ring.slot[0] // 4 - 1) % WINDOW  # slot after the spare: the oldest frame
            ring_keys = ring.k[layer][:, :, kept[torch.argsort(order * 4 + kept % 4)]]
            torch.testing.assert_close(ring_keys, cache.keys[layer], rtol=0, atol=1e-6)


def test_the_compiled_rollout_equals_the_eager_one_and_compiles_each_pass_once():
    """pipe(compile=True): classifier-free guidance (a batch of 2 per pass) over 14 frames of window 4; a second
    rollout of the same shape compiles nothing more."""
    pipe = make_pipe()
    eager = rollout(pipe).latents
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    compiled = rollout(pipe, compile=True).latents
    after_first = dynamo_utils.counters["stats"]["unique_graphs"]
    again = rollout(pipe, compile=True).latents
    # the Euler step's pass and the commit's (fewer if an earlier test compiled a model of the same shapes: Dynamo's
    # cache is per function, with the weights as inputs)
    assert after_first - graphs <= 2
    assert dynamo_utils.counters["stats"]["unique_graphs"] == after_first
    torch.testing.assert_close(compiled, eager, rtol=0, atol=ATOL)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
    assert (compiled[:, 2:] - compiled[:, 1:-1]).abs().amax() > 1e-2  # the frames move: a real rollout


def test_without_guidance_each_compiled_frame_is_one_call_and_the_same_frames():
    """pipe(compile=True) of Euler steps without guidance: once the ring is full, each new frame's steps and commit
    run as one compiled call (VideoDiT.euler_frame: 11 of the 12 new frames; the first one fills the cache to
    WINDOW - 1 = 3 frames with the 2 context frames), one graph for all of them, and the eager rollout's frames."""
    pipe = make_pipe()
    eager = rollout(pipe, guidance=1.0).latents
    frame_calls, euler_frame = [], pipe.transformer.euler_frame
    pipe.transformer.euler_frame = lambda *args: frame_calls.append(1) or euler_frame(*args)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    compiled = rollout(pipe, guidance=1.0, compile=True).latents
    after_first = dynamo_utils.counters["stats"]["unique_graphs"]
    again = rollout(pipe, guidance=1.0, compile=True).latents
    assert len(frame_calls) == 2 * 11  # two rollouts
    assert after_first - graphs <= 1 and dynamo_utils.counters["stats"]["unique_graphs"] == after_first
    torch.testing.assert_close(compiled, eager, rtol=0, atol=ATOL)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)


def test_euler_frame_is_the_euler_steps_and_the_commit():
    """VideoDiT.euler_frame on a ring against minisora.flow.euler_sample through the model's own passes and a commit
    on a copy of the ring: the same frame, the same keys, the ring moved on by one frame; refused before
    compile_rollout."""
    model = random_dit()
    cache = KVCache(2, position=3)
    x, times = torch.randn(1, WINDOW - 1, 4, 4, 4), time_grid(4, shift=2.0)
    noise, actions = torch.randn(1, 1, 4, 4, 4), torch.tensor([[2]])
    with torch.no_grad():
        model.commit(x, torch.zeros(1, WINDOW - 1), cache)
        ring, twin = KVRing(cache, WINDOW), KVRing(cache, WINDOW)
        with pytest.raises(ValueError, match="after compile_rollout"):
            model.euler_frame(noise, times, ring, actions)
        want = euler_sample(lambda y, t: model(y, t, actions, kv_cache=twin), noise, 4, shift=2.0)
        model.commit(want, torch.zeros(1, 1), twin, actions)
        got = model.compile_rollout().euler_frame(noise, times, ring, actions)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert ring.position == twin.position == 3 + WINDOW
    torch.testing.assert_close(ring.slot, twin.slot, rtol=0, atol=0)
    for layer in range(2):
        torch.testing.assert_close(ring.k[layer], twin.k[layer], rtol=0, atol=ATOL)
        torch.testing.assert_close(ring.v[layer], twin.v[layer], rtol=0, atol=ATOL)


def test_a_copy_of_a_compiled_model_runs_its_own_weights():
    """copy.deepcopy (an EMA copy, say) and pickle leave compile_rollout's passes behind: they are bound to the
    original, so a copy that kept them would roll out the original's weights."""
    import copy
    import pickle

    pipe = make_pipe()
    pipe.transformer.compile_rollout()
    twin = copy.deepcopy(pipe.transformer)
    assert twin._compiled is None and pipe.transformer._compiled is not None
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-1.0)  # other weights: other frames
    pipe.transformer, original = twin, pipe.transformer
    compiled, eager = rollout(pipe, compile=True).latents, rollout(pipe).latents  # the twin compiles its own passes
    pipe.transformer = original
    torch.testing.assert_close(compiled, eager, rtol=0, atol=ATOL)
    assert (compiled - rollout(pipe, compile=True).latents).abs().amax() > 1e-2  # not the original's frames
    assert pickle.loads(pickle.dumps(original))._compiled is None


@pytest.mark.parametrize("attention,short_frames,chunk,needs", [
    ("full", 0, 1, "kv_cache 'off'"), ("causal", 0, 2, "chunk 2"), ("causal", 2, 1, "short_frames 2")])
def test_compile_refuses_rollouts_it_cannot_speed_up(attention, short_frames, chunk, needs):
    pipe = make_pipe(attention, short_frames)
    with pytest.raises(ValueError, match="compile compiles a causal model's frame-by-frame rolling KV cache") as e:
        rollout(pipe, chunk=chunk, compile=True)
    assert needs in str(e.value)
    assert pipe.transformer._compiled is None  # refused before compiling anything


def test_a_ring_takes_only_a_full_cache_and_one_frame_at_a_time():
    model = random_dit()
    cache = KVCache(2)
    with torch.no_grad():
        model.commit(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 2), cache)
        with pytest.raises(ValueError, match="exactly window - 1 = 3 frames"):
            KVRing(cache, WINDOW)
        ring = KVRing(cache, 3)
        with pytest.raises(ValueError, match="one frame of 4 tokens, got 8 tokens"):
            model(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 2), kv_cache=ring)
        with pytest.raises(ValueError, match="keeps 2 frames, asked to keep 1"):
            ring.keep_last(1)
