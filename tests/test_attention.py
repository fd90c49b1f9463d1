"""The attention kernels on the CPU: FlexAttention (compiled, as on CUDA) against SDPA for every mask the model
uses, the masks against their definitions, mask caching, and one dtype for q, k, v under an fp32 norm.

torch's CPU build compiles FlexAttention's forward but has no backward for it, so gradients of flex are compared
on a GPU (benchmarks/gpu_check.py); here the forward of each mask, in fp32 and bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from minisora import attention
from minisora.attention import attend, causal_mask, resolve_kernel, teacher_forcing_mask
from minisora.model import VideoDiT

pytestmark = pytest.mark.skipif(not attention.flex_available(), reason="this torch has no FlexAttention")


def _dense_causal(first, frames, tokens):
    """The frame-causal rule written out: key frame <= query frame."""
    q_frame = (torch.arange(frames) + first).repeat_interleave(tokens)
    k_frame = torch.arange(first + frames).repeat_interleave(tokens)
    return k_frame[None, :] <= q_frame[:, None]


def _dense_teacher_forcing(frames, tokens, clean_only=0):
    """Clean frame i sees clean frames <= i; noisy frame i (a noisy copy of frames clean_only on) sees clean
    frames < i and noisy frame i."""
    copies = [(f, True) for f in range(frames)] + [(f, False) for f in range(clean_only, frames)]
    token = [c for c in copies for _ in range(tokens)]  # (frame, clean?) of each token
    allowed = torch.zeros(len(token), len(token), dtype=torch.bool)
    for q, (q_frame, q_clean) in enumerate(token):
        for k, (k_frame, k_clean) in enumerate(token):
            if q_clean:
                allowed[q, k] = k_clean and k_frame <= q_frame
            else:
                allowed[q, k] = (k_clean and k_frame < q_frame) or (not k_clean and k_frame == q_frame)
    return allowed


MASKS = {  # name -> (build(kernel), dense reference)
    "causal": (lambda kernel: causal_mask(0, 4, 6, "cpu", kernel), _dense_causal(0, 4, 6)),
    "kv_cache": (lambda kernel: causal_mask(3, 2, 6, "cpu", kernel), _dense_causal(3, 2, 6)),
    "teacher_forcing": (lambda kernel: teacher_forcing_mask(3, 6, "cpu", kernel), _dense_teacher_forcing(3, 6)),
    "teacher_forcing_after_memory": (lambda kernel: teacher_forcing_mask(5, 6, "cpu", kernel, clean_only=2),
                                     _dense_teacher_forcing(5, 6, clean_only=2)),
}


@pytest.mark.parametrize("name", MASKS)
def test_each_mask_is_its_definition(name):
    build, dense = MASKS[name]
    assert torch.equal(build("sdpa").sdpa, dense)
    flex = build("flex")
    assert flex.sdpa is None and flex.flex is not None
    # the BlockMask is built from the same mask_mod: evaluated densely, it is the same matrix
    assert torch.equal(flex.mod(None, None, torch.arange(flex.q_len)[:, None], torch.arange(flex.kv_len)[None]),
                       dense)


def test_a_single_query_frame_needs_no_mask_and_kernels_resolve_per_device():
    assert causal_mask(5, 1, 16, "cpu", "flex") is None  # one frame after cached ones sees every key
    assert resolve_kernel("auto", torch.device("cpu")) == "sdpa"
    assert resolve_kernel("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="must be one of auto, sdpa, flex"):
        resolve_kernel("xformers", torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_flex_matches_sdpa_for_every_mask(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    for name, (build, dense) in MASKS.items():
        nq, nk = dense.shape
        q = torch.randn(2, 3, nq, 32, generator=gen).to(dtype)
        k, v = (torch.randn(2, 3, nk, 32, generator=gen).to(dtype) for _ in range(2))
        flex, sdpa = attend(q, k, v, build("flex")), attend(q, k, v, build("sdpa"))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense)
        assert flex.dtype == dtype
        assert (flex.float() - ref).abs().max() < tol, name
        assert (flex.float() - sdpa.float()).abs().max() < tol, name


def test_masks_are_built_once_per_shape():
    model = VideoDiT(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, attention="causal")
    x, t = torch.randn(1, 3, 4, 4, 4), torch.rand(1, 3)
    attention._build.cache_clear()  # earlier tests may have built these shapes
    model(x, t, clean=x)
    misses = attention._build.cache_info().misses
    first = teacher_forcing_mask(3, 4, "cpu", "auto")
    model(x, t, clean=x)
    model(x, t)
    assert attention._build.cache_info().misses == misses + 1  # only the causal mask of the plain pass is new
    assert teacher_forcing_mask(3, 4, "cpu", "auto") is first


class _Fp32Norm(torch.nn.Module):
    """What CUDA autocast does to RMSNorm: it runs in fp32 and returns fp32 while the linear layers give bf16."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.norm(x.float())


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_q_k_v_reach_the_kernel_in_one_dtype_when_the_norm_runs_in_fp32(kernel, monkeypatch):
    # heads of 32 channels: smaller ones take a flex mask through SDPA on the CPU (the test below)
    model = VideoDiT(in_channels=4, patch_size=2, hidden_size=64, depth=1, num_heads=2, attention="causal")
    model.set_attention_kernel(kernel)
    attn = model.blocks[0].attn
    attn.q_norm, attn.k_norm = _Fp32Norm(attn.q_norm), _Fp32Norm(attn.k_norm)
    seen = []
    real = attention.attend

    def spy(q, k, v, mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, mask)

    monkeypatch.setattr("minisora.blocks.attend", spy)
    x, t = torch.randn(1, 2, 4, 4, 4), torch.rand(1, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x, t)
    assert seen == [(torch.bfloat16,) * 3]
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_small_heads_with_a_flex_mask_on_the_cpu_match_sdpa(dtype, tol):
    # torch 2.13's compiled CPU flex kernel gave wrong values (and NaN in bf16) for 16-channel heads over 8 or 24 keys
    # on an AVX2-only EPYC; attend runs such heads' flex masks through SDPA, so every kernel gives the same values
    gen = torch.Generator().manual_seed(0)
    for first, frames in ((0, 2), (4, 2)):  # 2 frames of 4 tokens: a plain causal pass (8 keys), after 4 cached (24)
        mask_flex = causal_mask(first, frames, 4, "cpu", "flex")
        assert mask_flex.flex is not None
        q = torch.randn(1, 2, frames * 4, 16, generator=gen).to(dtype)
        k, v = (torch.randn(1, 2, (first + frames) * 4, 16, generator=gen).to(dtype) for _ in range(2))
        out = attend(q, k, v, mask_flex)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=_dense_causal(first, frames, 4))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < tol


def test_flex_training_on_the_cpu_is_refused_up_front(tmp_path):
    from typer.testing import CliRunner

    from _store_helpers import make_store
    from cli.main import app

    make_store(tmp_path / "store", {"train": [8] * 2}, hw=(4, 4))
    r = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"),
                                 "--attention-kernel", "flex", "--device", "cpu", "--steps", "1"])
    assert r.exit_code == 1
    assert "--attention-kernel flex cannot train on the CPU" in r.output
