"""Training checkpoints: save, list, resolve `--resume`, load, and branches.

Layout (RUN/checkpoints/step-00000100/, renamed from a .tmp directory when complete):
    model/            booster.save_model (sharded)
    optimizer/        booster.save_optimizer (sharded on CUDA; `optimizer.bin`, one file, on CPU)
    ema.safetensors   EMA weights (fp32)
    zero-masters-rank<r>.safetensors   ZeRO only: rank r's fp32 master shards (the booster saves only the
                      bf16/fp16 working weights, and loading them would round the masters through them)
    state.json        step, sampler position, LR scheduler, lr, loss-scaler state, world size, batch
                      size, resolved config
    pipeline/         what `minisora sample` loads (transformer/ + minisora_pipeline.json)
    digests.json      sha256 of every file above, written last (before the rename); resume and sampling
                      check a checkpoint against it, so a flipped byte is found before it is trained or sampled on

Branches: resuming from step s while RUN/checkpoints holds newer steps would later collide with
them, and `--resume auto` would jump back to the old history. So that is refused, listing the
newer steps, unless the run asks for a branch: then the newer step directories move into
RUN/checkpoints/abandoned-<UTC time>/ (newest first, each move an atomic rename, so what is left is
always a contiguous prefix of the old history), with the metrics lines past s. Listing only looks
at `step-*` directly under checkpoints/, so nothing abandoned is ever resumed or sampled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from minisora.errors import MinisoraError, MinisoraWarning

DIGESTS = "digests.json"
STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FIELDS = ("step", "loader", "scheduler", "world_size", "batch_size", "grad_accum", "config")


class CheckpointError(MinisoraError, RuntimeError):
    """A checkpoint that cannot be used, in one line that names the path and what to do."""


def step_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def step_of(path: Path) -> int:
    m = STEP_RE.match(path.name)
    if m is None:
        raise CheckpointError(f"{path}: not a step-NNNNNNNN checkpoint directory")
    return int(m.group(1))


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (not .tmp, not abandoned-*/)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint, with every field training needs, or one clear error."""
    file = Path(path) / "state.json"
    if not file.is_file():
        raise CheckpointError(f"--resume {path}: not a checkpoint directory (no state.json)")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); resume from another checkpoint") from None
    missing = [k for k in STATE_FIELDS if k not in state] if isinstance(state, dict) else list(STATE_FIELDS)
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: written by another program or damaged; "
                              "resume from another checkpoint or start a new --out")
    return state


@dataclass(frozen=True)
class Resume:
    path: Path | None  # the checkpoint to load (None: start at step 0)
    step: int
    newer: tuple[Path, ...]  # checkpoints of this run past `step`: abandoned when the run branches
    skipped: tuple[str, ...] = ()  # `--resume auto`: damaged newer checkpoints passed over, each "path: why"


def resolve_resume(resume: str | None, out: str | Path, branch: bool) -> Resume:
    """What `--resume auto|PATH|none` means for run `out`; refuses to overwrite a newer history unless `branch`.

    Every checkpoint is checked against its digests.json first: `auto` passes over a damaged one (saying
    which and why; it moves to abandoned-<time>/ with any newer ones) and takes the next older; an explicit
    PATH that fails is an error naming the file."""
    ckpts = list_checkpoints(out)
    skipped: list[str] = []
    if resume == "auto":
        path = None
        for cand in reversed(ckpts):
            try:
                read_state(cand)
                optimizer_path(cand)
                verify_digests(cand)
            except CheckpointError as e:
                skipped.append(str(e))
                warnings.warn(f"--resume auto skips {cand.name}: {e}", MinisoraWarning, stacklevel=2)
                continue
            path = cand
            break
        if ckpts and path is None:
            raise CheckpointError(f"--resume auto: every checkpoint in {Path(out) / 'checkpoints'} is damaged "
                                  f"({'; '.join(skipped)}); start a new --out, or restore one of them")
    elif resume:
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"--resume {path}: not a checkpoint directory (no state.json)")
        read_state(path)
        verify_digests(path)
    else:
        path = None
    step = int(read_state(path)["step"]) if path is not None else 0
    newer = tuple(p for p in ckpts if step_of(p) > step)
    if newer and not branch and len(newer) > len(skipped):
        names = ", ".join(p.name for p in newer)
        start = f"from {path}" if path is not None else "from scratch"
        raise CheckpointError(f"starting {start} (step {step}) would overwrite the newer checkpoints {names} in "
                              f"{Path(out) / 'checkpoints'}: resume the newest with --resume auto, or pass --branch "
                              "to start a branch here (the newer ones move to checkpoints/abandoned-<time>/)")
    return Resume(path, step, newer, tuple(skipped))


# ------------------------------------------------------------------------------ digests
def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_digests(path: Path) -> None:
    """PATH/digests.json: the sha256 of every file under PATH (relative POSIX paths), written through a rename."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (DIGESTS, DIGESTS + ".tmp"))
    doc = {"sha256": {p.relative_to(path).as_posix(): file_sha256(p) for p in files}}
    tmp = path / (DIGESTS + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path / DIGESTS)


def verify_digests(path: Path, under: str = "") -> None:
    """Check the files of checkpoint PATH (only those under `under`, e.g. "pipeline/") against its digests.json.

    A missing or changed file is a CheckpointError naming it; a checkpoint without digests.json (written by an
    older minisora) is accepted with one warning."""
    path = Path(path)
    file = path / DIGESTS
    if not file.is_file():
        warnings.warn(f"{path}: no {DIGESTS} (written by an older minisora), so its files cannot be checked "
                      "for damage", MinisoraWarning, stacklevel=2)
        return
    try:
        recorded = json.loads(file.read_text())["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e}); the checkpoint cannot be checked: use another") from None
    for rel, digest in sorted(recorded.items()):
        if not rel.startswith(under):
            continue
        target = path / rel
        if not target.is_file():
            raise CheckpointError(f"{target}: missing (listed in {DIGESTS}); the checkpoint is damaged: use another")
        if file_sha256(target) != digest:
            raise CheckpointError(f"{target}: sha256 differs from the one recorded in {DIGESTS} when it was "
                                  "saved; the file is damaged: use another checkpoint")


def abandon(out: str | Path, newer: tuple[Path, ...], step: int) -> Path | None:
    """Move the checkpoints past `step` (and metrics.jsonl lines past it) into checkpoints/abandoned-<time>/."""
    if not newer:
        return None
    dest = Path(out) / "checkpoints" / time.strftime("abandoned-%Y%m%dT%H%M%SZ", time.gmtime())
    n = 1
    while dest.exists():  # two branches within a second
        dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
    dest.mkdir(parents=True)
    for p in sorted(newer, reverse=True):  # newest first: what stays is always a prefix of the history
        os.replace(p, dest / p.name)
    rewind_metrics(Path(out) / "metrics.jsonl", step, dest / "metrics.jsonl")
    return dest


def rewind_metrics(jsonl: Path, step: int, moved_to: Path | None = None) -> None:
    """Drop metrics lines past `step` (a resumed run logs them again); keep them in `moved_to` if given."""
    if not jsonl.exists():
        return
    keep, past = [], []
    for line in jsonl.read_text().splitlines():
        try:
            (past if json.loads(line).get("step", 0) > step else keep).append(line)
        except json.JSONDecodeError:  # a line cut by a kill -9 mid-write
            continue
    if moved_to is not None and past:
        moved_to.write_text("".join(x + "\n" for x in past))
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, jsonl)


def optimizer_path(path: Path) -> Path:
    for name in ("optimizer", "optimizer.bin"):
        if (path / name).exists():
            return path / name
    raise CheckpointError(f"{path} has no optimizer/ or optimizer.bin: the checkpoint is incomplete; resume from "
                          "another step-* directory, or start a new --out")


def save(booster, model, optimizer, final: Path, state: dict, write_rank0, rank: int, sharded_optimizer: bool,
         barrier) -> Path:
    """Write a checkpoint to `final`.tmp on every rank, then make it visible by one rename on rank 0.

    `write_rank0(tmp)` writes rank 0's own files (EMA, pipeline/); `barrier()` syncs the ranks.
    """
    if final.exists():
        raise CheckpointError(f"{final} exists already: this run's history goes past step {state['step']}; "
                              "resume with --resume auto, or --branch to start a branch")
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        _write_files(booster, model, optimizer, tmp, state, write_rank0, rank, sharded_optimizer)
    except OSError as e:  # a full disk, a lost mount: no half-written step-*.tmp is left for the next run
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: cannot write the checkpoint ({e.strerror or e}); nothing of it was kept, "
                              "the run's earlier checkpoints are intact: free space and resume with --resume auto"
                              ) from e
    barrier()
    if rank == 0:
        write_digests(tmp)  # every rank's files are there now
        os.replace(tmp, final)  # visible only when complete
    barrier()
    return final


def _write_files(booster, model, optimizer, tmp: Path, state: dict, write_rank0, rank: int,
                 sharded_optimizer: bool) -> None:
    booster.save_model(model, str(tmp / "model"), shard=True)
    booster.save_optimizer(optimizer, str(tmp / ("optimizer" if sharded_optimizer else "optimizer.bin")),
                           shard=sharded_optimizer)
    masters = master_shards(model, optimizer)
    if masters:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in masters.items()},
                  str(tmp / f"zero-masters-rank{rank}.safetensors"))
    if rank == 0:
        write_rank0(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def prune(out: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, booster, model, optimizer, rank: int = 0) -> None:
    """Model and optimizer shards through the booster (the plugin's own checkpoint I/O)."""
    if not (path / "model").exists():
        raise CheckpointError(f"{path} has no model/: the checkpoint is incomplete; resume from another step-*")
    opt = optimizer_path(path)
    for what, load_fn in ((path / "model", booster.load_model), (opt, booster.load_optimizer)):
        try:  # ZeRO's load_model also copies the working weights into the masters ...
            load_fn(model if what.name == "model" else optimizer, str(what))
        except (RuntimeError, OSError, ValueError, KeyError) as e:  # e.g. a truncated file: torch names none
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{what}: cannot be loaded ({reason}); resume from another step-* directory "
                                  "(--resume PATH), or start a new --out") from e
    masters = master_shards(model, optimizer)
    saved = path / f"zero-masters-rank{rank}.safetensors"
    if masters and saved.exists():  # ... so the exact fp32 masters are put back
        from safetensors.torch import load_file

        for name, value in load_file(str(saved)).items():
            if name not in masters or masters[name].shape != value.shape:
                raise CheckpointError(f"{saved}: master shard {name} does not fit this run's model and world size")
            masters[name].copy_(value)


def master_shards(model, optimizer) -> dict:
    """ZeRO's fp32 master shards of this rank by parameter name ({} for optimizers that keep none)."""
    working_to_master = getattr(optimizer, "get_working_to_master_map", None)
    if working_to_master is None:
        return {}
    masters = working_to_master()
    module = model.unwrap() if hasattr(model, "unwrap") else model
    return {name: masters[id(p)] for name, p in module.named_parameters() if id(p) in masters}
