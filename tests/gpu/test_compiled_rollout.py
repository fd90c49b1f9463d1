"""On CUDA: a compiled rolling rollout (`DiTPipeline(..., compile=True)`, minisora.kv_cache.KVRing) gives the eager
rollout's frames, and a second rollout of the same shape compiles nothing more (tests/test_kv_ring.py on the CPU)."""

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

pytestmark = pytest.mark.gpu


def test_the_compiled_rollout_equals_the_eager_one_on_cuda():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from minisora.model import VideoDiT
    from minisora.pipeline import DiTPipeline
    from minisora.vae import build_vae, tiny_vae_config

    torch.manual_seed(0)
    dit = VideoDiT.from_preset("tiny", in_channels=4, patch_size=2, attention="causal", num_actions=3)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.02)  # a fresh adaLN-Zero DiT would predict v = 0
    pipe = DiTPipeline(dit, build_vae("kl", tiny_vae_config("kl")).model, FlowMatchEulerDiscreteScheduler(),
                       window_frames=8, latent_size=[16, 16]).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    ctx = torch.randn(2, 4, 4, 16, 16, device="cuda")
    actions = torch.randint(0, 3, (2, 24), device="cuda")

    def rollout(compile: bool) -> torch.Tensor:
        return pipe(context_latents=ctx, num_frames=24, num_inference_steps=4, actions=actions, guidance=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
                    compile=compile).latents

    eager = rollout(False)
    compiled = rollout(True)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    again = rollout(True)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-3)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
