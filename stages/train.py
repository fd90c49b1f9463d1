"""Stage two: train a flow-matching video DiT on a latent store with ColossalAI.

Runs as one process (`minisora train ...`) or under torchrun on one or many nodes
(`torchrun --nproc_per_node=N --no-python minisora train ...`). The training hot path touches no
pixels and no VAE: it reads fp16 latent windows (minisora.dataset), draws the posterior sample on
the device, and optimises minisora.flow's loss. Distribution is ColossalAI's Booster with a plugin
picked by name. Randomness of step s on rank r comes from a seed derived from (seed, s, r), so a
resumed run repeats exactly what the uninterrupted run would have done.

Checkpoint layout (RUN/checkpoints/step-00000100/, renamed from a .tmp directory when complete):
    model/            booster.save_model (sharded)
    optimizer/        booster.save_optimizer (sharded on CUDA, one file on CPU)
    ema.safetensors   EMA weights (fp32)
    state.json        step, sampler position, LR scheduler, world size, batch size, resolved config
    pipeline/         what `minisora sample` loads: transformer/ (EMA weights + config) and
                      minisora_pipeline.json (VAE reference, latent statistics, frames, fps)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minisora.dataset import LatentWindows, WindowLoader, WindowSampler, sample_latents
from minisora.dist import barrier, dist_info, print0
from minisora.flow import FlowConfig, flow_loss, noisy, sample_times
from minisora.model import DIT_MODEL_SPECS, VideoDiT
from minisora.store import LatentStore

PLUGINS = ("ddp", "zero1", "zero2", "gemini")
CUDA_ONLY_PLUGINS = ("zero1", "zero2", "gemini")


@dataclass
class TrainConfig:
    store: str
    out: str
    model: str = "tiny"
    attention: str = "full"  # full (bidirectional in the window) | causal (a frame sees itself and earlier frames)
    patch_size: int = 2  # spatial patch on the latents (tokens per frame = h*w / patch_size^2)
    frames: int = 8  # latent frames per training window
    batch_size: int = 8  # windows per rank per micro-step
    lr: float = 3e-4
    warmup: int = 100
    lr_schedule: str = "cosine"  # constant | cosine (to min_lr_ratio * lr at the last step, after warm-up)
    min_lr_ratio: float = 0.1
    steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    plugin: str = "ddp"
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum: int = 1
    grad_checkpoint: bool = False
    ema_decay: float = 0.999
    ckpt_every: int = 500
    keep_last: int = 3
    sample_every: int = 0  # 0: never
    resume: str | None = "auto"  # auto | PATH | None
    use_actions: bool = False
    seed: int = 0
    log_every: int = 10
    split: str = "train"
    cache_shards: int = 8
    flow: FlowConfig = field(default_factory=FlowConfig)
    wandb: bool = False
    device: str = "auto"


# ---------------------------------------------------------------------------------------- set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(device: str) -> torch.device:
    """Join (or, as a single process, create) the process group through ColossalAI."""
    import colossalai
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if dist.is_initialized():  # already launched in this process (e.g. called twice from Python)
        return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if "RANK" not in os.environ:  # plain `minisora train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    colossalai.launch_from_torch(backend="nccl" if use_cuda else "gloo", seed=0, verbose=False)
    if use_cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_plugin(name: str, precision: str, device: torch.device):
    """The ColossalAI plugin for `name`; the CUDA-only ones refuse CPU with a clear message."""
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    if name not in PLUGINS:
        raise ValueError(f"unknown plugin {name!r}; choose one of {', '.join(PLUGINS)}")
    if name in CUDA_ONLY_PLUGINS and device.type != "cuda":
        raise RuntimeError(f"--plugin {name} needs CUDA GPUs (ColossalAI's {'GeminiPlugin' if name == 'gemini' else 'LowLevelZeroPlugin'} "
                           "and HybridAdam have no CPU implementation); on CPU use --plugin ddp")
    if name == "ddp":
        return TorchDDPPlugin(find_unused_parameters=False)
    if name in ("zero1", "zero2"):
        return LowLevelZeroPlugin(stage=int(name[-1]), precision=precision if precision != "fp32" else "fp32")
    return GeminiPlugin(precision=precision if precision != "fp32" else "fp16", placement_policy="static")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    if cfg.plugin in CUDA_ONLY_PLUGINS:
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


LR_SCHEDULES = ("constant", "cosine")


def lr_lambda(warmup: int, steps: int = 0, schedule: str = "constant", min_ratio: float = 0.1):
    """LR multiplier of `step`: linear warm-up, then constant or a cosine decay to `min_ratio` at `steps`
    (nanoGPT's schedule). A pure function of the step, so a resumed run continues on the same curve."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def step_seed(seed: int, step: int, rank: int) -> int:
    """All randomness of (step, rank) derives from this, so resuming repeats it exactly."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


# ---------------------------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach().float(), 1.0 - decay)


# ---------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(out: str | Path) -> list[Path]:
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.exists() else []


def pipeline_meta(store: LatentStore, cfg: TrainConfig, num_actions: int) -> dict:
    """What sampling needs besides the weights: the VAE to decode with, latent statistics, geometry."""
    lay = store.layout(cfg.split)
    return {"vae": store.attrs["vae"], "latent_stats": store.attrs["latent_stats"], "source": store.attrs["source"],
            "store": store.url, "frames": cfg.frames, "latent_size": [lay.height, lay.width],
            "use_actions": cfg.use_actions, "num_actions": num_actions, "scheduler": {"type": "flow_euler", "shift": 1.0}}


def save_pipeline(path: Path, model: VideoDiT, ema: dict[str, torch.Tensor], store: LatentStore, cfg: TrainConfig) -> None:
    """A directory `minisora sample` loads: the EMA transformer + minisora_pipeline.json."""
    ema_model = VideoDiT.from_config(model.config)
    ema_model.load_state_dict({k: v.to(torch.float32) for k, v in ema.items()})
    ema_model.save_pretrained(path / "transformer", safe_serialization=True)
    meta = pipeline_meta(store, cfg, model.config.num_actions)
    (path / "minisora_pipeline.json").write_text(json.dumps(meta, indent=2))


class Validator:
    """Rank 0, every --sample-every steps: continue a few held-out clips with the EMA weights, decode
    them with the store's VAE, save ground truth | generation gifs and report PSNR of the generated
    frames (and of repeating the last context frame). Decoding here is validation, not training."""

    def __init__(self, cfg: TrainConfig, store: LatentStore, model: VideoDiT, device: torch.device, clips: int = 2):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from minisora.pipeline import DiTPipeline
        from minisora.vae import VideoVAE
        from stages.sample import pipeline_kwargs

        v = store.attrs["vae"]
        vae = VideoVAE.load(v["source"], subfolder=v.get("subfolder"), revision=v.get("revision"), device=device)
        meta = pipeline_meta(store, cfg, model.config.num_actions)
        self.pipe = DiTPipeline(VideoDiT.from_config(model.config), vae.model, FlowMatchEulerDiscreteScheduler(shift=1.0),
                                **pipeline_kwargs(meta)).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.store, self.cfg = store, cfg
        self.split = "test" if "test" in store.splits else cfg.split
        self.context = max(1, cfg.frames // 2)
        self.total = 2 * cfg.frames
        lengths = store.array(self.split, "length")[:]
        self.clips = [int(i) for i in np.flatnonzero(lengths >= self.total)[:clips]]

    @torch.no_grad()
    def __call__(self, step: int, ema: dict[str, torch.Tensor]) -> dict:
        from minisora.metrics import frames_to_unit, psnr_per_frame
        from minisora.video import write_gif
        from stages.sample import load_context, side_by_side

        self.pipe.transformer.load_state_dict(ema)
        k_pix = self.pipe.video_vae.pixel_frames(self.context)
        psnr, psnr_repeat = [], []
        for i in self.clips:
            ctx = load_context(self.pipe, f"{self.store.url}:{self.split}:{i}", self.context)
            acts = None
            if self.cfg.use_actions and ctx.actions is not None:
                acts = torch.from_numpy(ctx.actions[: self.total])[None]
            out = self.pipe(context_latents=ctx.latents, num_frames=self.total, actions=acts, steps=10,
                            generator=torch.Generator().manual_seed(i), progress=False)
            frames = out.frames[0]
            if ctx.truth is None:
                continue
            n = min(len(frames), len(ctx.truth))
            truth = frames_to_unit(ctx.truth[None, k_pix:n])  # (1, T, 3, H, W)
            psnr.append(float(psnr_per_frame(frames_to_unit(frames[None, k_pix:n]), truth).mean()))
            repeat = np.repeat(ctx.truth[k_pix - 1:k_pix], n - k_pix, axis=0)
            psnr_repeat.append(float(psnr_per_frame(frames_to_unit(repeat[None]), truth).mean()))
            write_gif(Path(self.cfg.out) / "samples" / f"step-{step:08d}-{self.split}-{i}.gif",
                      side_by_side(ctx.truth, frames, k_pix), fps=8)
        if not psnr:
            return {}
        return {"val_psnr": sum(psnr) / len(psnr), "val_psnr_repeat_last": sum(psnr_repeat) / len(psnr_repeat)}


def save_checkpoint(booster, model, optimizer, scheduler, ema, loader_state, step, cfg, store, world, device) -> Path:
    rank = dist_info()[0]
    final = Path(cfg.out) / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    booster.save_model(model, str(tmp / "model"), shard=True)
    # sharded optimizer checkpoints do not load back on ColossalAI's CPU accelerator
    booster.save_optimizer(optimizer, str(tmp / ("optimizer" if device.type == "cuda" else "optimizer.bin")),
                           shard=device.type == "cuda")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        state = {"step": step, "loader": loader_state, "scheduler": scheduler.state_dict(), "world_size": world,
                 "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "config": _config_json(cfg)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        save_pipeline(tmp / "pipeline", model.unwrap() if hasattr(model, "unwrap") else model, ema, store, cfg)
    barrier()
    if rank == 0:
        os.replace(tmp, final)  # visible only when complete
        for old in list_checkpoints(cfg.out)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        ckpts = list_checkpoints(cfg.out)
        return ckpts[-1] if ckpts else None
    path = Path(cfg.resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no state.json)")
    return path


def load_checkpoint(path: Path, booster, model, optimizer, scheduler, ema, cfg, world, device) -> tuple[int, dict]:
    state = json.loads((path / "state.json").read_text())
    if (state["world_size"], state["batch_size"], state["grad_accum"]) != (world, cfg.batch_size, cfg.grad_accum):
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes x batch {state['batch_size']} x accum "
            f"{state['grad_accum']}; this run has {world} x {cfg.batch_size} x {cfg.grad_accum}. Resuming would change "
            "the data order and the effective batch: run with the same sizes, or start a new --out (optionally "
            "initialised from this checkpoint's pipeline/)")
    booster.load_model(model, str(path / "model"))
    opt_path = path / "optimizer" if (path / "optimizer").exists() else path / "optimizer.bin"
    booster.load_optimizer(optimizer, str(opt_path))
    scheduler.load_state_dict(state["scheduler"])
    for k, v in load_file(str(path / "ema.safetensors")).items():
        ema[k].copy_(v)
    return state["step"], state["loader"]


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


# ---------------------------------------------------------------------------------------- logging
class Logger:
    """metrics.jsonl + TensorBoard (+ wandb when asked and installed), rank 0 only."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(cfg.out) / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.out) / "tensorboard"))
        except ImportError:
            print0("tensorboard not installed: logging to metrics.jsonl only")
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="minisora", config=_config_json(cfg), dir=cfg.out)
            except ImportError:
                print0("--wandb asked for but wandb is not installed (pip install wandb): skipped")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


# ---------------------------------------------------------------------------------------- main
def main(cfg: TrainConfig) -> dict:
    torch.set_flush_denormal(True)  # denormal floats make CPU convs/matmuls ~30x slower (seen in vae train)
    from colossalai.booster import Booster

    if cfg.model not in DIT_MODEL_SPECS:
        raise ValueError(f"unknown --model {cfg.model!r}; choose one of {', '.join(DIT_MODEL_SPECS)}")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.lr_schedule not in LR_SCHEDULES or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {cfg.lr_schedule!r}) and "
                         f"--min-lr-ratio in [0, 1] (got {cfg.min_lr_ratio})")
    device = launch(cfg.device)
    if cfg.plugin in CUDA_ONLY_PLUGINS and device.type != "cuda":
        build_plugin(cfg.plugin, cfg.precision, device)  # raises the clear CPU message
    rank, world, _ = dist_info()
    if cfg.precision == "fp16" and device.type != "cuda":
        raise RuntimeError("--precision fp16 needs a CUDA GPU; on CPU use fp32 or bf16")

    # 1. data: a complete store, windows of cfg.frames latent frames
    store = LatentStore(cfg.store)
    windows = LatentWindows(store, cfg.split, cfg.frames, cache_shards=cfg.cache_shards)
    sampler = WindowSampler(windows, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    num_actions = int(store.attrs.get("num_actions", 0)) if cfg.use_actions else 0
    if cfg.use_actions and num_actions == 0:
        raise ValueError(f"--use-actions: store {cfg.store} records no actions")

    # 2. model, optimizer, booster
    lay = store.layout(cfg.split)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if lay.height % cfg.patch_size or lay.width % cfg.patch_size:
        raise ValueError(f"--patch-size {cfg.patch_size} does not divide the store's {lay.height}x{lay.width} latents")
    model = VideoDiT.from_preset(cfg.model, in_channels=lay.channels, patch_size=cfg.patch_size,
                                 num_actions=num_actions, attention=cfg.attention)
    if cfg.grad_checkpoint:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    ema = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, cfg.steps, cfg.lr_schedule, cfg.min_lr_ratio))
    plugin = build_plugin(cfg.plugin, cfg.precision, device)
    mixed = cfg.precision if (cfg.plugin == "ddp" and cfg.precision == "fp16") else None
    booster = Booster(plugin=plugin, mixed_precision=mixed)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    autocast_dtype = torch.bfloat16 if (cfg.plugin == "ddp" and cfg.precision == "bf16") else None

    # 3. resume
    step, loader_state = 0, None
    ckpt = resolve_resume(cfg)
    if ckpt is not None:
        step, loader_state = load_checkpoint(ckpt, booster, model, optimizer, scheduler, ema, cfg, world, device)
        print0(f"resumed from {ckpt} at step {step}")
    loader = WindowLoader(sampler, state=loader_state)
    stats_mean, stats_std = windows.stats_mean.to(device), windows.stats_std.to(device)
    if rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text(json.dumps(_config_json(cfg), indent=2))
    print0(f"train: {cfg.model} DiT, {n_params / 1e6:.2f}M parameters; {len(windows.usable)} clips in {cfg.split}, "
           f"{sampler.batches_per_epoch()} batches/epoch; {world} process(es) x batch {cfg.batch_size} x accum "
           f"{cfg.grad_accum} on {device.type}, plugin {cfg.plugin}, {cfg.precision}")

    logger = Logger(cfg, enabled=rank == 0)
    unwrapped = model.unwrap() if hasattr(model, "unwrap") else model
    validator = Validator(cfg, store, unwrapped, device) if cfg.sample_every > 0 and rank == 0 else None
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train", unit="step")
    model.train()
    t_last, windows_since, loss_sum, loss_n = time.time(), 0, torch.zeros((), device=device), 0
    last_loss = math.nan
    try:
        while step < cfg.steps:
            torch.manual_seed(step_seed(cfg.seed, step, rank))  # action dropout etc.
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, rank))
            for micro in range(cfg.grad_accum):
                batch = next(loader).to(device)
                x0 = sample_latents(batch, stats_mean, stats_std, gen)  # (B, F, C, h, w) normalised latents
                t, context = sample_times(x0.shape[0], x0.shape[1], cfg.flow, generator=gen, device=device)
                noise = torch.randn(x0.shape, generator=gen, device=device)
                xt = noisy(x0, noise, t)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    v = model(xt, t, batch.actions if cfg.use_actions else None)
                loss = flow_loss(v.float(), x0, noise, context) / cfg.grad_accum
                booster.backward(loss, optimizer)
                loss_sum += loss.detach()
                windows_since += x0.shape[0] * world
            if cfg.grad_clip > 0:
                optimizer.clip_grad_by_norm(cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            ema_update(ema, unwrapped, cfg.ema_decay)
            loss_n += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_loss = float((loss_sum / loss_n).item())  # one host sync per log interval
                dt = time.time() - t_last
                metrics = {"loss": last_loss, "lr": scheduler.get_last_lr()[0], "steps_per_s": loss_n / dt,
                           "windows_per_s": windows_since / dt, "epoch": loader.epoch}
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{last_loss:.4f}", windows_s=f"{metrics['windows_per_s']:.0f}")
                t_last, windows_since, loss_sum, loss_n = time.time(), 0, torch.zeros((), device=device), 0
            bar.update(1)
            if cfg.ckpt_every > 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                save_checkpoint(booster, model, optimizer, scheduler, ema, loader.state_dict(), step, cfg, store, world, device)
            if validator is not None and step % cfg.sample_every == 0:
                metrics = validator(step, ema)
                logger.log(step, metrics)
                if metrics:
                    bar.write(f"step {step}: validation PSNR {metrics['val_psnr']:.2f} dB "
                              f"(repeat last frame {metrics['val_psnr_repeat_last']:.2f} dB)")
    finally:
        loader.close()
        bar.close()
        logger.close()
    return {"step": step, "loss": last_loss, "params": n_params, "checkpoints": [str(p) for p in list_checkpoints(cfg.out)]}
