"""minisora.checkpoint: listing, --resume resolution, branches, and one-line errors for broken checkpoints."""

import json
from pathlib import Path

import pytest

from minisora import checkpoint as ckpt

STATE = {"step": 0, "loader": {}, "scheduler": {}, "world_size": 1, "batch_size": 2, "grad_accum": 1, "config": {}}


def _fake_run(root: Path, steps=(3, 6, 9)) -> Path:
    """A run directory with complete step-* checkpoints (state.json + optimizer.bin) and their metrics lines."""
    for s in steps:
        d = ckpt.step_dir(root, s)
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({**STATE, "step": s}))
        (d / "optimizer.bin").write_bytes(b"x")
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 10)))
    return root


def test_listing_skips_tmp_and_abandoned(tmp_path):
    run = _fake_run(tmp_path)
    (run / "checkpoints" / "step-00000012.tmp").mkdir()
    (run / "checkpoints" / "abandoned-20260101T000000Z" / "step-00000015").mkdir(parents=True)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003", "step-00000006", "step-00000009"]
    assert ckpt.list_checkpoints(tmp_path / "nothing") == []


def test_resolve_auto_path_and_none(tmp_path):
    run = _fake_run(tmp_path)
    auto = ckpt.resolve_resume("auto", run, branch=False)
    assert auto.path.name == "step-00000009" and auto.step == 9 and auto.newer == ()
    assert ckpt.resolve_resume("auto", tmp_path / "fresh", branch=False) == ckpt.Resume(None, 0, ())
    newest = ckpt.resolve_resume(str(ckpt.step_dir(run, 9)), run, branch=False)
    assert newest.step == 9 and newest.newer == ()
    with pytest.raises(ckpt.CheckpointError, match=r"--resume .*nowhere: not a checkpoint directory \(no state.json\)"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), run, branch=False)


def test_older_resume_is_refused_listing_the_newer_ones(tmp_path):
    run = _fake_run(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resolve_resume(str(ckpt.step_dir(run, 3)), run, branch=False)
    msg = str(e.value)
    assert "(step 3) would overwrite the newer checkpoints step-00000006, step-00000009" in msg and "--branch" in msg
    with pytest.raises(ckpt.CheckpointError, match="starting from scratch .step 0. would overwrite"):
        ckpt.resolve_resume(None, run, branch=False)
    branch = ckpt.resolve_resume(str(ckpt.step_dir(run, 3)), run, branch=True)
    assert [p.name for p in branch.newer] == ["step-00000006", "step-00000009"]


def test_branch_moves_newer_checkpoints_and_metrics_aside(tmp_path):
    run = _fake_run(tmp_path)
    where = ckpt.resolve_resume(str(ckpt.step_dir(run, 3)), run, branch=True)
    dest = ckpt.abandon(run, where.newer, where.step)
    assert dest.parent == run / "checkpoints" and dest.name.startswith("abandoned-")
    assert sorted(p.name for p in dest.iterdir()) == ["metrics.jsonl", "step-00000006", "step-00000009"]
    assert json.loads((dest / "step-00000009" / "state.json").read_text())["step"] == 9  # moved, not copied
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003"]
    assert ckpt.resolve_resume("auto", run, branch=False).step == 3  # auto never picks an abandoned step
    kept = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    moved = [json.loads(x)["step"] for x in (dest / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3] and moved == [4, 5, 6, 7, 8, 9]
    assert ckpt.abandon(run, (), 3) is None
    second = ckpt.abandon(run, (ckpt.step_dir(run, 3),), 0)  # a second branch within the same second
    assert second != dest and (second / "step-00000003").is_dir()


def test_rewind_metrics_drops_repeated_steps_and_cut_lines(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"event": "resume", "at_step": 1}\n{"step": 3,')
    ckpt.rewind_metrics(jsonl, 1)
    assert [json.loads(x) for x in jsonl.read_text().splitlines()] == [{"step": 1, "loss": 1},
                                                                       {"event": "resume", "at_step": 1}]


def test_state_lacking_fields_and_missing_optimizer_are_one_line_errors(tmp_path):
    d = tmp_path / "checkpoints" / "step-00000002"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": 2, "loader": {}}))
    with pytest.raises(ckpt.CheckpointError, match=r"state.json lacks scheduler, world_size, batch_size, grad_accum, "
                                                   r"config: written by another program or damaged"):
        ckpt.read_state(d)
    (d / "state.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"state.json: not valid JSON"):
        ckpt.read_state(d)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000002 has no optimizer/ or optimizer.bin: the checkpoint "
                                                   r"is incomplete"):
        ckpt.optimizer_path(d)


def test_saving_over_an_existing_step_is_refused_before_writing(tmp_path):
    run = _fake_run(tmp_path, steps=(3,))
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000003 exists already: this run's history goes past"):
        ckpt.save(None, None, None, ckpt.step_dir(run, 3), {"step": 3}, None, 0, False, barrier=lambda: None)
    assert not (run / "checkpoints" / "step-00000003.tmp").exists()


def test_digests_name_a_changed_or_missing_file_and_old_checkpoints_warn(tmp_path):
    d = tmp_path / "step-00000001"
    (d / "model").mkdir(parents=True)
    (d / "model" / "w.bin").write_bytes(b"weights")
    (d / "state.json").write_text("{}")
    ckpt.write_digests(d)
    ckpt.verify_digests(d)
    (d / "model" / "w.bin").write_bytes(b"weightz")
    ckpt.verify_digests(d, under="pipeline/")  # only the pipeline/ files are checked there
    with pytest.raises(ckpt.CheckpointError, match=r"model/w.bin: sha256 differs from the one recorded"):
        ckpt.verify_digests(d)
    (d / "model" / "w.bin").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"model/w.bin: missing \(listed in digests.json\)"):
        ckpt.verify_digests(d)
    (d / "digests.json").unlink()
    with pytest.warns(UserWarning, match="no digests.json"):
        ckpt.verify_digests(d)


class _FullDiskBooster:
    """A booster whose model save meets a full disk (ENOSPC), as ColossalAI's would."""

    def save_model(self, model, path, shard):
        import errno
        import os

        Path(path).mkdir()
        (Path(path) / "part.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_a_full_disk_while_saving_leaves_no_tmp_and_names_the_checkpoint(tmp_path):
    final = ckpt.step_dir(tmp_path, 4)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000004: cannot write the checkpoint \(No space left on "
                                                     r"device\); nothing of it was kept"):
        ckpt.save(_FullDiskBooster(), None, None, final, {**STATE, "step": 4}, lambda tmp: None, 0,
                  sharded_optimizer=False, barrier=lambda: None)
    assert not final.exists() and not final.with_name(final.name + ".tmp").exists()
