"""The compiled training step, as `minisora train --compile` runs it (on CUDA by default), on the CPU: the default
recipe (causal attention, teacher forcing, context noise) through stages.train's own build_run and train_step,
compiled against eager, and no recompile once the first step has compiled. And a whole model compiled by
`model.compile()`, against eager."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from _store_helpers import make_store
from minisora import plugins
from minisora.model import VideoDiT

SCRIPT = r"""
import json, sys
import torch
import torch._dynamo.utils as dynamo_utils
from minisora import plugins
from minisora.dataset import WindowLoader
from stages.train import TrainConfig, build_run, train_step

store, out = sys.argv[1:3]
device = plugins.launch("cpu")
contract = plugins.check_combination("ddp", "fp32", device, 0.0)
result = {}
for compiled in (False, True):
    cfg = TrainConfig(store=store, out=out, frames=4, batch_size=2, steps=6, warmup=1, lr=1e-3, compile=compiled,
                      precision="fp32", device="cpu", ema_decay=0.0)
    run = build_run(cfg, contract, "fp32", device)
    loader = WindowLoader(run.sampler)
    stats = (run.windows.stats_mean, run.windows.stats_std)
    rows = []
    for step in range(cfg.steps):
        loss, norm = train_step(run, loader, step, stats)
        counters = dynamo_utils.counters
        rows.append({"loss": float(loss), "norm": float(norm), "graphs": counters["stats"]["unique_graphs"],
                     "recompiles": sum(counters["recompiles"].values())})
    loader.close()
    weights = {k: v.detach().clone() for k, v in run.module.state_dict().items()}
    result["compiled" if compiled else "eager"] = {"rows": rows, "weights": weights}
diff = max((result["compiled"]["weights"][k] - v).abs().max().item() for k, v in result["eager"]["weights"].items())
print(json.dumps({"eager": result["eager"]["rows"], "compiled": result["compiled"]["rows"], "weight_diff": diff}))
"""


@pytest.mark.slow
def test_the_compiled_default_step_matches_eager_and_never_recompiles(tmp_path):
    make_store(tmp_path / "store", {"train": [8] * 4}, hw=(8, 8), clips_per_shard=2)
    # a fresh world of one: other tests may have launched a process group in this process (its port is taken)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store"), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600, env=plugins.fresh_world_env(dict(os.environ)))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    eager, compiled = got["eager"], got["compiled"]
    assert eager[0]["graphs"] == 0  # nothing was compiled in the eager run
    for e, c in zip(eager, compiled):  # the same losses and gradient norms, step by step
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4, abs=1e-6)
        assert c["norm"] == pytest.approx(e["norm"], rel=1e-4)
    assert got["weight_diff"] < 1e-4  # after 6 AdamW steps
    assert compiled[0]["graphs"] >= 1  # the blocks compiled at the first step ...
    assert [c["graphs"] for c in compiled[1:]] == [compiled[0]["graphs"]] * 5  # ... and the next 5 added none
    assert [c["recompiles"] for c in compiled] == [compiled[0]["recompiles"]] * 6


def test_a_compiled_forward_matches_eager_without_cache_warnings():
    """`model.compile()` of a whole VideoDiT (what a user does; benchmarks/rollout.py's recompute): the same velocity
    as eager, and no Dynamo warning about the lru_caches of the RoPE angles and the causal mask."""
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, attention="causal").eval()
    with torch.no_grad():
        for p in model.parameters():  # random weights everywhere (adaLN starts at zero): a velocity that moves
            p.normal_(0.0, 0.1)
    compiled = VideoDiT.from_config(model.config).eval()
    compiled.load_state_dict(model.state_dict())
    compiled.compile(dynamic=False)
    x, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([[0.0, 0.5, 0.9]])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, want = compiled(x, t), model(x, t)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
