"""Stage one: push every frame of every manifest clip once through a VAE into a Zarr latent store.

Runs as one process or under `torchrun` (each rank takes whole shards, round robin). The unit of
work is a shard: its clips are read (a thread pool decodes ahead), encoded in batches of frames,
and the finished shard is written and committed by a writer thread while the VAE works on the
next one. Committed shards are skipped on a re-run, so an interrupted job resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import minisora
from minisora.configs import EncodeConfig  # re-exported: the defaults live there, torch-free for the CLI
from minisora.data.clips import ACTION_DTYPE, ClipError, read_clip
from minisora.data.manifest import Manifest, ManifestClip
from minisora.dist import barrier, dist_info, init_distributed, print0, resolve_device
from minisora.errors import MinisoraError
from minisora.store import LatentStore, SplitLayout, StoreError, clips_per_shard_for, narrow
from minisora.store_guard import LOCK_NAME, check_out, encode_lock, remove_store
from minisora.store_meta import check_meta
from minisora.vae import VideoVAE, frames_to_pixels


class EncodeError(MinisoraError, RuntimeError):
    """A manifest, VAE or --out that encode cannot use; the message names it and says what to do."""


DEFAULT_SPLITS = EncodeConfig.__dataclass_fields__["splits"].default


def _used_frames(clip_frames: int, stride: int, vae: VideoVAE) -> int:
    return vae.usable_frames(math.ceil(clip_frames / stride))


def plan_store(cfg: EncodeConfig, manifest: Manifest, vae: VideoVAE) -> tuple[dict, dict[str, SplitLayout]]:
    """Store attributes and per-split layouts, all derived from the manifest and the VAE."""
    clips = [c for c in manifest.clips if c.split in cfg.splits]
    if not clips:
        raise EncodeError(f"{cfg.manifest}: no clips in splits {', '.join(cfg.splits)}")
    sizes = {(c.height, c.width) for c in clips}
    if cfg.size is None and len(sizes) > 1:
        raise EncodeError(f"{cfg.manifest}: clips have several resolutions {sorted(sizes)}; pass --size to resize them")
    native = list(next(iter(sizes))) if len(sizes) == 1 else None
    h, w = (cfg.size, cfg.size) if cfg.size else native
    sc = vae.info.spatial_compression
    if h % sc or w % sc:
        raise EncodeError(f"frames of {h}x{w} are not divisible by the VAE's spatial compression {sc}")
    layouts = {}
    has = manifest.split_counts()
    for split in cfg.splits:
        sc_clips = manifest.by_split(split)
        if not sc_clips and tuple(cfg.splits) != DEFAULT_SPLITS:  # the default takes those of them it finds
            raise EncodeError(f"--splits {split}: the manifest {cfg.manifest} has no clips in split {split!r} "
                              f"(it has {', '.join(sorted(has))})")
        if not sc_clips:
            continue
        frames = max(vae.latent_frames(_used_frames(c.frames, cfg.frame_stride, vae)) for c in sc_clips)
        c_lat, hl, wl = vae.info.latent_channels, h // sc, w // sc
        per_shard = cfg.clips_per_shard or clips_per_shard_for(frames, c_lat, hl, wl, cfg.shard_mb)
        layouts[split] = SplitLayout(len(sc_clips), frames, c_lat, hl, wl, min(per_shard, len(sc_clips)))
    try:
        from minisora.data import load_dataset_card

        fps = load_dataset_card(manifest.kind)["clip"].get("fps")
    except Exception:  # a card is informative, never required
        fps = None
    attrs = {
        "vae": asdict(vae.info),
        "source": {"kind": manifest.kind, "manifest_digest": manifest.digest(), "root": manifest.root,
                   "resolution": [h, w], "native_resolution": native,
                   "frame_stride": cfg.frame_stride, "fps": fps / cfg.frame_stride if fps else None},
        "encode": {"dtype": cfg.dtype, "batch_size": cfg.batch_size},
        "manifest_skipped": manifest.skipped,  # clips `data manifest --on-error skip` left out, with reasons
        "minisora_version": minisora.__version__,
    }
    return attrs, layouts


_IDENTITY = ("weights_sha256", "config_sha256")  # checked on their own, with both digests in the message


def _same_plan(store: LatentStore, attrs: dict, layouts: dict[str, SplitLayout]) -> list[str]:
    diffs = []
    for key in ("vae", "source"):
        have, want = store.attrs.get(key) or {}, json.loads(json.dumps(attrs[key]))
        if key == "vae":
            have, want = ({k: v for k, v in d.items() if k not in _IDENTITY} for d in (have, want))
        if have != want:
            diffs.append(key)
    if store.attrs.get("splits") != {s: asdict(lay) for s, lay in layouts.items()}:
        diffs.append("splits/geometry")
    if (store.attrs.get("encode") or {}).get("dtype") != attrs["encode"]["dtype"]:
        diffs.append("dtype")
    return diffs


def open_or_create_store(cfg: EncodeConfig, manifest: Manifest, vae: VideoVAE, attrs: dict,
                         layouts: dict[str, SplitLayout]) -> LatentStore:
    """Rank 0 only: create the store, or reopen it when it was made with the same settings."""
    from minisora.store import _fs_and_root

    fs, root, _ = _fs_and_root(cfg.out)
    check_out(cfg.out)  # a file, or a directory of the user's that is not a store: refused, nothing touched
    if fs.exists(f"{root}/zarr.json"):
        if cfg.overwrite or _interrupted_create(fs, root, layouts):
            remove_store(cfg.out, layouts)  # only the store's own files
        else:
            store = LatentStore(cfg.out, mode="a")
            if store.attrs.get("complete"):  # its statistics and VAE record as encoded, or an error naming them
                check_meta(cfg.out, store.attrs)
            diffs = _same_plan(store, attrs, layouts)
            if diffs:
                raise EncodeError(f"{cfg.out} exists and was encoded with other settings ({', '.join(diffs)} differ); "
                                  "pass --overwrite to start over or choose another --out")
            recorded = (store.attrs.get("vae") or {}).get("weights_sha256")
            if recorded is not None and recorded != vae.info.weights_sha256:
                now = str(vae.info.weights_sha256)[:16]
                raise EncodeError(f"{cfg.out} was encoded by VAE weights {recorded[:16]}, "
                                  f"but {cfg.vae} now has weights {now} (same name and config, other weights); "
                                  f"pass --overwrite to re-encode "
                                  "everything with this VAE, or choose another --out")
            if recorded is None:
                print0(f"warning: {cfg.out} records no VAE weights digest (encoded by an older minisora); resuming "
                       f"without checking that {cfg.vae} is the VAE its committed shards were encoded with")
            return store
    manifest_json = json.dumps({"kind": manifest.kind, "root": manifest.root,
                                "clips": [asdict(c) for c in manifest.clips if c.split in layouts]})
    return LatentStore.create(cfg.out, attrs, layouts, vae.info.deterministic, manifest_json, cfg.compression_level)


def _interrupted_create(fs, root: str, layouts: dict[str, SplitLayout]) -> bool:
    """True when OUT holds only what `LatentStore.create` writes before its attributes (which come last):
    a run killed while creating the store. Nothing can have been committed yet, so it is safe to start over."""
    try:
        attrs = json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes") or {}
    except (ValueError, AttributeError):  # an empty or half-written zarr.json
        attrs = {}
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} - {LOCK_NAME}
    return ("schema" not in attrs and names <= {"zarr.json", "manifest.json", *layouts}
            and not any(fs.exists(f"{root}/{split}/_commits") for split in layouts))


def _rank0_view(flags: list[bool]) -> list[bool]:
    """Rank 0's list of flags on every rank, so that all ranks split the same pending shards."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor(flags, dtype=torch.int32)
    dist.broadcast(t, src=0)
    return [bool(x) for x in t.tolist()]


def _read(manifest: Manifest, clip: ManifestClip, stride: int, used: int):
    try:
        manifest.check_clip(clip)  # the recorded sha256, when `data manifest --checksum` recorded one
        frames, actions = read_clip(manifest.abspath(clip), manifest.kind)
    except ClipError as e:
        return e
    if frames.shape[1:3] != (clip.height, clip.width):
        return ClipError(manifest.abspath(clip), f"frames are {frames.shape[1]}x{frames.shape[2]}, the manifest "
                         f"promised {clip.height}x{clip.width}")
    frames = frames[::stride][:used]
    if len(frames) < used:
        return ClipError(manifest.abspath(clip), f"decoded {len(frames)} frames, the manifest promised {clip.frames} "
                         f"(>= {used} after stride {stride})")
    if actions is not None:
        actions = actions[::stride][:used]
    return frames, actions


@torch.no_grad()
def encode_clip(vae: VideoVAE, frames: np.ndarray, cfg: EncodeConfig, device: torch.device, dtype: torch.dtype):
    """uint8 (T, H, W, 3) frames -> posterior mean, logvar (T', C, h, w) float32 numpy."""
    # (T, 3, H, W) in [-1, 1]; uint8 crosses to the device
    pixels = frames_to_pixels(torch.from_numpy(frames).to(device))
    if cfg.size and pixels.shape[-2:] != (cfg.size, cfg.size):
        pixels = F.interpolate(pixels, size=(cfg.size, cfg.size), mode="bilinear", antialias=True, align_corners=False)
    pixels = pixels.to(dtype)
    if vae.info.temporal_compression > 1:  # video VAE: the whole clip in one causal pass
        mean, logvar = vae.encode(pixels[None])
        mean, logvar = mean[0], (logvar[0] if logvar is not None else None)
    else:  # image VAE: frames in batches
        outs = [vae.encode(pixels[i:i + cfg.batch_size][None]) for i in range(0, len(pixels), cfg.batch_size)]
        mean = torch.cat([m[0] for m, _ in outs])
        logvar = None if outs[0][1] is None else torch.cat([lv[0] for _, lv in outs])
    mean = mean.float().cpu().numpy()
    return mean, (logvar.float().cpu().numpy() if logvar is not None else None)


def main(cfg: EncodeConfig) -> dict:
    with ExitStack() as held:  # rank 0 holds the store's encode lock until the end
        return _main(cfg, held)


def _main(cfg: EncodeConfig, held: ExitStack) -> dict:
    init_distributed()
    rank, world, _ = dist_info()
    device = resolve_device(cfg.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    manifest = Manifest.load(cfg.manifest, root=cfg.root)
    check_out(cfg.out)  # before the VAE loads: a bad --out fails at once
    if os.path.isdir(cfg.vae):  # record where the VAE is, wherever sampling runs from
        cfg.vae = os.path.abspath(cfg.vae)
    vae = VideoVAE.load(cfg.vae, subfolder=cfg.vae_subfolder, revision=cfg.vae_revision, device=device, dtype=dtype)
    attrs, layouts = plan_store(cfg, manifest, vae)
    err = None
    if rank == 0:
        try:
            held.enter_context(encode_lock(cfg.out))  # a second encode into the same --out is refused
            open_or_create_store(cfg, manifest, vae, attrs, layouts)
        except (EncodeError, StoreError) as e:
            err = e
    barrier()
    if err is not None:
        raise err
    store = LatentStore(cfg.out, mode="a")
    if _same_plan(store, attrs, layouts):
        raise EncodeError(f"{cfg.out}: store settings differ from this run (another rank failed to create it?)")

    # Ranks split the shards still pending, round robin: a resumed run stays balanced, and since every
    # rank works from rank 0's one listing of the commit markers, no two ranks ever take the same shard.
    work = [(s, k) for s in layouts for k in range(layouts[s].num_shards)]
    committed = _rank0_view([store.is_committed(s, k) for s, k in work])
    pending = [w for w, done in zip(work, committed) if not done]
    mine = pending[rank::world]
    n_clips = sum(layouts[s].shard_range(k)[1] - layouts[s].shard_range(k)[0] for s, k in mine)
    print0(f"encode: {len(work)} shards in {', '.join(f'{s}: {lay.num_shards}' for s, lay in layouts.items())}; "
           f"{len(work) - len(pending)} already committed; {world} process(es); rank 0 encodes {n_clips} clips")
    stats = _encode_shards(cfg, manifest, vae, store, layouts, mine, device, dtype, show=cfg.progress and rank == 0)
    barrier()
    summary = {"rank_clips": stats["clips"], "rank_frames": stats["frames"], "seconds": stats["seconds"]}
    if rank == 0:
        store = LatentStore(cfg.out, mode="a")
        if any(store.pending_shards(s) for s in store.splits):
            raise EncodeError(f"{cfg.out}: some shards are still uncommitted after all ranks finished")
        summary["latent_stats"] = store.finalize()
        summary["skipped"] = store.attrs["skipped"]
        summary["manifest_skipped"] = store.attrs.get("manifest_skipped", [])
    return summary


def _encode_shards(cfg, manifest, vae, store, layouts, shards, device, dtype, show: bool) -> dict:
    from tqdm.auto import tqdm

    clip_jobs = []  # (split, shard, index in split, clip)
    for split, k in shards:
        lo, hi = layouts[split].shard_range(k)
        split_clips = manifest.by_split(split)
        clip_jobs += [(split, k, i, split_clips[i]) for i in range(lo, hi)]
    bar = tqdm(total=len(clip_jobs), unit="clip", disable=not show, desc="encode")
    try:  # the bar ends its line before any error is printed
        return _run_jobs(cfg, manifest, vae, store, layouts, clip_jobs, device, dtype, bar)
    finally:
        bar.close()


def _run_jobs(cfg, manifest, vae, store, layouts, clip_jobs, device, dtype, bar) -> dict:
    t0, frames_done = time.time(), 0
    with ThreadPoolExecutor(cfg.read_workers) as readers, ThreadPoolExecutor(1) as writer:
        used = {id(c): _used_frames(c.frames, cfg.frame_stride, vae) for *_, c in clip_jobs}
        ahead = max(2 * cfg.read_workers, 4)
        futures: list[Future] = [readers.submit(_read, manifest, c, cfg.frame_stride, used[id(c)])
                                 for *_, c in clip_jobs[:ahead]]
        pending_write: Future | None = None
        block = None
        for j, (split, k, idx, clip) in enumerate(clip_jobs):
            if j + ahead < len(clip_jobs):
                futures.append(readers.submit(_read, manifest, clip_jobs[j + ahead][3], cfg.frame_stride,
                                              used[id(clip_jobs[j + ahead][3])]))
            lay = layouts[split]
            lo, hi = lay.shard_range(k)
            if block is None:
                block = _new_block(lay, hi - lo, vae.info.deterministic)
            result = futures[j].result()
            futures[j] = None  # free the frames
            i = idx - lo
            block["keys"].append(clip.path)
            if isinstance(result, ClipError):
                if cfg.on_error != "skip":
                    raise EncodeError(f"{result} "
                                      f"(use --on-error skip to leave bad clips out; committed shards are kept)")
                block["skipped"].append({"index": idx, "path": clip.path, "reason": result.problem})
            else:
                frames, actions = result
                mean, logvar = encode_clip(vae, frames, cfg, device, dtype)
                n = mean.shape[0]
                where = manifest.abspath(clip)
                block["mean"][i, :n] = narrow(mean, block["mean"].dtype, f"{where}: latents")
                if logvar is not None:
                    block["logvar"][i, :n] = narrow(logvar, block["logvar"].dtype, f"{where}: latent logvar")
                if actions is not None:
                    lat = vae.latent_actions(actions, n)
                    block["actions"][i, :n] = narrow(lat, block["actions"].dtype, f"{where}: actions")
                block["lengths"][i] = n
                frames_done += len(frames)
            bar.update(1)
            bar.set_postfix(frames_s=f"{frames_done / max(time.time() - t0, 1e-9):.0f}")
            if idx == hi - 1:  # shard complete: hand it to the writer, keep encoding
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer.submit(store.write_shard, split, k, block["mean"], block["logvar"],
                                              block["actions"], block["lengths"], block["keys"], block["skipped"])
                block = None
        if pending_write is not None:
            pending_write.result()
    return {"clips": len(clip_jobs), "frames": frames_done, "seconds": time.time() - t0}


def _new_block(lay: SplitLayout, n: int, deterministic: bool) -> dict:
    shape = (n, lay.frames, lay.channels, lay.height, lay.width)
    return {"mean": np.full(shape, np.nan, np.float16),
            "logvar": None if deterministic else np.full(shape, np.nan, np.float16),
            "actions": np.full((n, lay.frames), -1, ACTION_DTYPE), "lengths": np.zeros(n, np.int32),
            "keys": [], "skipped": []}

