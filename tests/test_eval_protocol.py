"""TECO's protocol at its own shape (`minisora eval --protocol`) and the memory-answerable split.

The split is checked on constant-colour frames whose MSEs are known by hand, then the whole path as a user
runs it: revisit clips of 300 frames, a manifest, a tiny VAE, a store, a tiny trained causal run, and
`minisora eval --protocol teco-psnr` rolling out 156 frames with the KV cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from minisora.configs import EVAL_PROTOCOLS
from minisora.memory_split import (answerable_share, context_match_mse, memory_answerable, split_over_seeds,
                                   split_scores)
from minisora.metrics import frame_errors, frames_to_unit
from stages.evaluate import EvalConfig, EvalError, memory_lines, memory_report, resolve_protocol


def _video(levels: list[list[int]]) -> np.ndarray:
    """uint8 clips (B, T, 2, 2, 3) of constant frames: frame t of clip b has every sub-pixel = levels[b][t]."""
    return np.broadcast_to(np.array(levels, np.uint8)[:, :, None, None, None], (len(levels), len(levels[0]), 2, 2, 3))


# ------------------------------------------------------------------------------------ the split, by hand


def test_memory_answerable_on_frames_known_by_hand():
    # context A=0, B=100, C=200 (K=3); targets A, B, C, 190, 60
    video = _video([[0, 100, 200, 0, 100, 200, 190, 60]])
    best, last = context_match_mse(video, 3)
    assert best.tolist() == [[0.0, 0.0, 100.0**2, 90.0**2, 40.0**2]]  # the nearest of A and B
    assert last.tolist() == [[200.0**2, 100.0**2, 0.0, 10.0**2, 140.0**2]]  # against C
    assert memory_answerable(video, 3).tolist() == [[True, True, False, False, True]]
    # 60: 1600 against 19600, 10.9 dB apart: answerable at a 10 dB margin, not at 11
    assert memory_answerable(video, 3, margin_db=10).tolist() == [[True, True, False, False, True]]
    assert memory_answerable(video, 3, margin_db=11).tolist() == [[True, True, False, False, False]]
    assert answerable_share(memory_answerable(video, 3)) == pytest.approx(3 / 5)


def test_a_still_camera_and_a_single_context_frame_answer_nothing():
    still = _video([[200, 200, 200, 200, 0], [0, 50, 50, 50, 50]])  # ties go to the last frame
    assert not memory_answerable(still, 3).any() and memory_answerable(still, 3).shape == (2, 2)
    video = _video([[0, 100, 0, 100]])
    assert not memory_answerable(video, 1).any()  # K = 1: no earlier context frame
    assert torch.isinf(context_match_mse(video, 1)[0]).all()
    with pytest.raises(ValueError, match="uint8 frames.*1 <= context < T.*context 4"):
        memory_answerable(video, 4)
    with pytest.raises(ValueError, match="uint8 frames"):
        memory_answerable(frames_to_unit(video), 2)


def _errors(mse: list[list[float]]) -> dict[str, torch.Tensor]:
    """`frame_errors` of frames whose MSE against a grey target is exactly the given value."""
    target = torch.full((len(mse), len(mse[0]), 3, 12, 12), 0.5, dtype=torch.float64)
    return frame_errors(target + torch.tensor(mse, dtype=torch.float64).sqrt()[:, :, None, None, None], target)


def test_split_scores_and_the_empty_subset():
    e = _errors([[0.01, 0.0001, 0.001]])
    mask = torch.tensor([[True, False, True]])
    s = split_scores(e, mask)
    assert s["memory"]["frames"] == 2 and s["rest"]["frames"] == 1
    assert s["memory"]["psnr_mse"] == pytest.approx(10 * math.log10(1 / 0.0055))
    assert s["memory"]["psnr"] == pytest.approx(25.0) and s["rest"]["psnr"] == pytest.approx(40.0)
    assert s["memory"]["ssim"] == pytest.approx(e["ssim"][mask].mean().item())
    none = split_scores(e, torch.zeros(1, 3, dtype=torch.bool))  # no answerable frame: null numbers, 0 frames
    assert none["memory"] == {"frames": 0, "psnr_mse": None, "psnr": None, "ssim": None}
    assert none["rest"]["psnr_mse"] == pytest.approx(10 * math.log10(1 / ((0.01 + 0.0001 + 0.001) / 3)))
    seeds = split_over_seeds([e, _errors([[0.0001, 0.0001, 0.0001]])], mask)
    assert seeds["memory"]["psnr"] == pytest.approx({"mean": 32.5, "std": 7.5, "n": 2})
    assert split_over_seeds([e], torch.zeros(1, 3, dtype=torch.bool))["memory"]["psnr_mse"] is None


def test_memory_report_and_its_lines_say_when_no_frame_is_answerable():
    truth = _video([[0, 100, 200, 0, 210], [0, 100, 200, 190, 200]])  # K=3: answerable only (0, 3)
    errs = _errors([[0.01, 0.001], [0.001, 0.001]])
    rep = memory_report(truth, 3, 0.0, [errs], {"latent_copy": errs})
    assert rep["share"] == pytest.approx(0.25) and rep["share_at_0_db"] == pytest.approx(0.25) and rep["frames"] == 4
    assert rep["baselines"]["latent_copy"]["memory"]["psnr_mse"] == pytest.approx(20.0)
    assert rep["model"]["memory"]["psnr_mse"] == {"mean": pytest.approx(20.0), "std": 0.0, "n": 1}
    lines = memory_lines(rep)
    assert lines[0].startswith("memory-answerable frames: 25.0% of 4") and "0 dB" in lines[0]
    assert lines[2].split()[:3] == ["model", "20.00", "±"] and lines[3].split()[:2] == ["latent_copy", "20.00"]
    empty = memory_report(_video([[0, 0, 0, 0]]), 2, 6.0, [_errors([[0.01, 0.01]])],
                          {"latent_copy": _errors([[0.01, 0.01]])})
    assert empty["share"] == 0.0 and "n/a (no frames)" in memory_lines(empty)[2]


# ------------------------------------------------------------------------------------ protocol presets


def test_protocol_sets_teco_shapes_and_refuses_other_counts():
    assert EVAL_PROTOCOLS == {"teco-fvd": (36, 300), "teco-psnr": (144, 300)}
    base = dict(checkpoint="run", store="store")
    cfg = resolve_protocol(EvalConfig(**base, protocol="teco-psnr"))
    assert (cfg.context_frames, cfg.frames) == (144, 300)
    cfg = resolve_protocol(EvalConfig(**base, protocol="teco-fvd", frames=300), ("frames",))
    assert (cfg.context_frames, cfg.frames) == (36, 300)
    assert resolve_protocol(EvalConfig(**base)) == EvalConfig(**base)
    with pytest.raises(EvalError, match="--protocol teco-psnr sets --frames 300 .*144 context -> 156 generated.*"
                                        "--frames 16 was given"):
        resolve_protocol(EvalConfig(**base, protocol="teco-psnr"), ("frames",))  # 16 given explicitly
    with pytest.raises(EvalError, match="sets --context-frames 36 .* --context-frames 8 was given"):
        resolve_protocol(EvalConfig(**base, protocol="teco-fvd", context_frames=8))
    with pytest.raises(EvalError, match="--protocol 'teco': unknown; expected one of teco-fvd, teco-psnr"):
        resolve_protocol(EvalConfig(**base, protocol="teco"))


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def revisit_run(tmp_path_factory) -> Path:
    """2 train + 2 test revisit clips of 300 frames, a tiny random VAE, a store at 16x16, a causal run of 4 steps."""
    from minisora.data.manifest import build_manifest
    from minisora.data.synthetic import write_synthetic_dataset
    from minisora.vae import build_vae, tiny_vae_config
    from stages.encode import EncodeConfig, main as encode_main
    from stages.train import TrainConfig, main as train_main

    root = tmp_path_factory.mktemp("protocol")
    write_synthetic_dataset("dmlab", root / "data", clips=2, test_clips=2, frames=300, seed=0, progress=False,
                            motion="revisit")
    build_manifest(root / "data", "dmlab")[0].save(root / "manifest.json")
    torch.manual_seed(0)
    build_vae("kl", tiny_vae_config("kl")).model.save_pretrained(root / "vae")
    encode_main(EncodeConfig(manifest=str(root / "manifest.json"), vae=str(root / "vae"), out=str(root / "store"),
                             size=16, clips_per_shard=2, progress=False, device="cpu"))
    train_main(TrainConfig(store=str(root / "store"), out=str(root / "run"), frames=4, batch_size=2, steps=4, warmup=1,
                           lr=1e-3, ckpt_every=4, log_every=4, use_actions=True, device="cpu"))
    return root


def test_eval_teco_psnr_rolls_out_156_frames_and_splits_the_score(revisit_run, tmp_path):
    from minisora.context import clip_frames
    from minisora.pipeline import DiTPipeline
    from minisora.store import LatentStore

    out = tmp_path / "psnr.json"
    base = ["eval", "--checkpoint", str(revisit_run / "run"), "--store", str(revisit_run / "store"), "--num-clips",
            "2", "--seeds", "1", "--steps", "1", "--out", str(out)]
    r = CliRunner().invoke(app, base + ["--protocol", "teco-psnr"])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert (rep["config"]["context_frames"], rep["config"]["frames"]) == (144, 300)
    assert rep["config"]["protocol"] == "teco-psnr" and rep["generated_frames_per_clip"] == 156
    assert rep["rollout"]["kv_cache"] == "rolling"  # the causal model rolls out 300 frames with its cache
    curves = [rep["model"]["per_horizon"]] + [b["per_horizon"] for b in rep["baselines"].values()]
    assert all(len(c[k]) == 156 for c in curves for k in ("psnr", "psnr_mse", "ssim"))
    assert Path(rep["horizon_plot"]).is_file()

    # the split, recomputed from the source clips at the store's size; repeat-last-frame scored by hand on it
    pipe = DiTPipeline.from_run(str(revisit_run / "run"))
    manifest = LatentStore(revisit_run / "store").manifest_json()
    truth = np.stack([clip_frames(pipe, Path(manifest["root"]) / c, "dmlab")[0][:300] for c in rep["clips"]])
    mask = memory_answerable(truth, 144, 6.0)
    split = rep["memory_split"]
    assert split["share"] == pytest.approx(answerable_share(mask)) and split["frames"] == 2 * 156
    assert split["share_at_0_db"] >= split["share"] > 0
    repeat = frames_to_unit(np.repeat(truth[:, 143:144], 156, axis=1))
    mse = (repeat.double() - frames_to_unit(truth[:, 144:]).double()).pow(2).mean(dim=(2, 3, 4))  # (2, 156)
    got = split["baselines"]["repeat_last_context_frame"]
    assert got["memory"]["psnr_mse"] == pytest.approx(10 * math.log10(1 / mse[mask].mean().item()), abs=1e-6)
    assert got["rest"]["frames"] == int((~mask).sum())
    assert set(split["baselines"]) == set(rep["baselines"]) and split["model"]["memory"]["psnr_mse"]["n"] == 1
    assert f"memory-answerable frames: {100 * split['share']:.1f}% of 312" in r.output

    base[-1] = str(tmp_path / "fvd.json")
    r = CliRunner().invoke(app, base + ["--protocol", "teco-fvd", "--frames", "16"])  # the default, but given
    assert r.exit_code == 1 and "--protocol teco-fvd sets --frames 300" in r.output
    assert "--frames 16 was given" in r.output and not (tmp_path / "fvd.json").exists()
