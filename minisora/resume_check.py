"""Whether a resumed run is the same run: this run's settings against those its checkpoint recorded.

Everything that changes what is trained must match: the store (its VAE weights and the manifest it was
encoded from), the model (preset, patch size, attention), the windows (frames, split, actions), the seed
and the data order (processes x batch x accumulation, open shards). A difference is refused with the list
of all of them, one line each. Allowed, and said: a new --lr (the schedule continues with the new peak,
stages/train.py) and a new flow recipe (announced here, and recorded in metrics.jsonl by the caller).
"""

from __future__ import annotations

import json
from pathlib import Path

from minisora.checkpoint import CheckpointError

# config field -> (CLI option, value when an older checkpoint lacks the field; None: not compared then)
SAME = {"model": ("--model", None), "patch_size": ("--patch-size", None), "attention": ("--attention", "full"),
        "short_frames": ("--short-frames", 0), "memory_pool": ("--memory-pool", 2),
        "retrieve_frames": ("--retrieve-frames", 0), "retrieve_motion": ("--retrieve-motion", ""),
        "retrieve_radius": ("--retrieve-radius", 0.0),
        "frames": ("--frames", None), "split": ("--split", None), "use_actions": ("--use-actions", None),
        "seed": ("--seed", None), "cache_shards": ("--cache-shards", None)}
RECIPE_DEFAULTS = {"teacher_forcing": 0.0, "context_noise": 0.0, "logit_mean": 0.0}  # absent in older checkpoints


def store_identity(store) -> dict:
    """What makes a store's latents what they are: the VAE's weights and the manifest they were encoded from."""
    return {"vae_weights_sha256": (store.attrs.get("vae") or {}).get("weights_sha256"),
            "manifest_digest": (store.attrs.get("source") or {}).get("manifest_digest")}


def saved_identity(state: dict, path: Path) -> dict | None:
    """The store identity a checkpoint recorded (state.json; an older one: its pipeline description)."""
    if "store" in state:
        return state["store"]
    meta_file = Path(path) / "pipeline" / "minisora_pipeline.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    return {"vae_weights_sha256": (meta.get("vae") or {}).get("weights_sha256"),
            "manifest_digest": (meta.get("source") or {}).get("manifest_digest")}


def differences(state: dict, cfg, world: int, store, path: Path) -> list[str]:
    """One line per setting of this run that differs from checkpoint `path`'s (state.json `state`)."""
    old, out = state["config"], []
    for key, (option, missing) in SAME.items():
        was = old.get(key, missing)
        if was is not None and was != getattr(cfg, key):
            out.append(f"was trained with {option} {was}; this run has {option} {getattr(cfg, key)}")
    sizes = (state["world_size"], state["batch_size"], state["grad_accum"])
    if sizes != (world, cfg.batch_size, cfg.grad_accum):
        out.append(f"was written by {sizes[0]} processes x batch {sizes[1]} x accum {sizes[2]}; this run has "
                   f"{world} x {cfg.batch_size} x {cfg.grad_accum} (the data order and the effective batch would "
                   "change)")
    saved, now = saved_identity(state, path), store_identity(store)
    for key, what in (("vae_weights_sha256", "VAE weights"), ("manifest_digest", "manifest")):
        was = (saved or {}).get(key)
        if was is not None and now[key] is not None and was != now[key]:
            out.append(f"was trained on a store of {what} {was[:16]}; this run's --store {cfg.store} has "
                       f"{what} {now[key][:16]}")
    return out


def recipe_changes(state: dict, cfg) -> dict[str, tuple]:
    """Flow recipe fields this run changes: {field: (checkpoint's value, this run's)}; allowed, to be announced."""
    flow, changes = state["config"].get("flow") or {}, {}
    for key, now in vars(cfg.flow).items():
        before = flow.get(key, RECIPE_DEFAULTS.get(key))
        if key in RECIPE_DEFAULTS:
            before = before or 0.0
        if before is not None and before != now:
            changes[key] = (before, now)
    return changes


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def announcement(key: str, before, now, step: int) -> str:
    return f"--{key.replace('_', '-')} {_num(now)} replaces the checkpoint's {_num(before)} from step {step} on"


def check_resume(state: dict, cfg, world: int, store, path: Path) -> dict[str, tuple]:
    """Refuse resuming checkpoint `path` with settings that change what is trained (CheckpointError listing every
    difference); return the flow recipe changes, which are allowed."""
    diffs = differences(state, cfg, world, store, path)
    if diffs:
        lines = "\n".join(f"  {d}" for d in diffs)
        raise CheckpointError(f"{path} cannot be resumed by this run, which differs in what is trained:\n{lines}\n"
                              "Run with the checkpoint's settings, or start a new --out (optionally initialised from "
                              "this checkpoint's pipeline/)")
    return recipe_changes(state, cfg)
