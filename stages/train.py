"""Stage two: train a flow-matching video DiT on a latent store with ColossalAI.

Runs as one process (`minisora train ...`) or under torchrun on one or many nodes
(`torchrun --nproc_per_node=N --no-python minisora train ...`). The training hot path touches no
pixels and no VAE: it reads fp16 latent windows (minisora.dataset), draws the posterior sample on
the device, and optimises minisora.flow's loss. Distribution is ColossalAI's Booster with a plugin
picked by name; what each plugin does for precision, clipping, accumulation, EMA and checkpoints
is its contract in minisora.plugins. Randomness of step s on rank r comes from a seed derived from
(seed, s, r), so a resumed run repeats exactly what the uninterrupted run would have done.
Checkpoints and branches: minisora.checkpoint. The EMA: minisora.ema.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minisora import checkpoint as ckpt
from minisora import plugins
from minisora.attention import resolve_kernel
from minisora.configs import TrainConfig  # re-exported: the defaults live there, torch-free for the CLI
from minisora.dataset import LatentWindows, WindowLoader, WindowSampler, sample_latents
from minisora.dist import barrier, dist_info, print0
from minisora.ema import EMA
from minisora.flow import flow_loss, noisy, sample_times, teacher_forcing_times
from minisora.hardware import PRECISIONS, enable_tf32, resolve_precision
from minisora.model import DIT_MODEL_SPECS, VideoDiT
from minisora.retrieval import RetrievalWindows, check_setting, memory_line, parse_motion, with_memory
from minisora.resume_check import announcement, check_resume, store_identity
from minisora.run_dir import save_run
from minisora.store import LatentStore
from minisora.train_report import Logger, Validator, config_json

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


def teacher_forcing_share(cfg: TrainConfig) -> float:
    """cfg.flow.teacher_forcing, or where it is None (auto) 1 for a causal model and 0 for full attention."""
    share = cfg.flow.teacher_forcing
    return share if share is not None else (1.0 if cfg.attention == "causal" else 0.0)


def is_teacher_forcing_step(cfg: TrainConfig, step: int) -> bool:
    """Whether `step` trains with teacher forcing (a share cfg.flow.teacher_forcing of the steps); the same
    answer on every rank, and again after a resume."""
    if (p := teacher_forcing_share(cfg)) <= 0 or p >= 1:
        return p >= 1
    return torch.rand((), generator=torch.Generator().manual_seed(step_seed(cfg.seed, step, 0))).item() < p


def long_short_line(cfg: TrainConfig) -> str:
    """How a long-short model attends, for the start-of-training line ("" for every frame in full)."""
    if not cfg.short_frames:
        return ""
    return (f", long-short: the last {cfg.short_frames} frames in full, older ones pooled "
            f"{cfg.memory_pool}x{cfg.memory_pool}")


def check_config(cfg: TrainConfig) -> None:
    if teacher_forcing_share(cfg) > 0 and cfg.attention != "causal":
        raise ValueError(f"--teacher-forcing {cfg.flow.teacher_forcing} needs --attention causal (a full-attention "
                         "model has no frame order to force)")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if resolve_kernel(cfg.attention_kernel, torch.device("cpu")) == "flex" and on_cpu:  # also checks the name
        raise ValueError("--attention-kernel flex cannot train on the CPU: torch's CPU FlexAttention has no backward "
                         "pass; use --attention-kernel sdpa (or auto)")
    if cfg.short_frames and cfg.attention != "causal":
        raise ValueError(f"--short-frames {cfg.short_frames} (long-short attention) needs --attention causal")
    if cfg.short_frames < 0 or cfg.memory_pool < 1:
        raise ValueError(f"--short-frames must be >= 0 and --memory-pool >= 1, got {cfg.short_frames} and "
                         f"{cfg.memory_pool}")
    check_setting(cfg.retrieve_frames, cfg.frames, cfg.attention, cfg.short_frames, cfg.retrieve_motion,
                  cfg.use_actions, cfg.retrieve_radius)
    if cfg.frames < 2:
        raise ValueError(f"--frames {cfg.frames}: a training window needs at least 2 latent frames (the model learns "
                         "to continue frames from earlier ones, and a 1-frame model cannot continue anything)")
    if cfg.model not in DIT_MODEL_SPECS:
        raise ValueError(f"unknown --model {cfg.model!r}; choose one of {', '.join(DIT_MODEL_SPECS)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.lr_schedule not in LR_SCHEDULES or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {cfg.lr_schedule!r}) and "
                         f"--min-lr-ratio in [0, 1] (got {cfg.min_lr_ratio})")


# ---------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything the training step touches, built once by `build_run`."""
    cfg: TrainConfig
    contract: plugins.Contract
    precision: str
    device: torch.device
    store: LatentStore
    windows: LatentWindows
    sampler: WindowSampler
    model: torch.nn.Module  # boosted
    module: VideoDiT  # the unwrapped model
    optimizer: object
    scheduler: object
    booster: object
    ema: EMA | None  # rank 0 only, and only where the plugin can keep one
    params: int


def build_run(cfg: TrainConfig, contract: plugins.Contract, precision: str, device: torch.device) -> Run:
    rank, world, _ = dist_info()
    store = LatentStore(cfg.store)  # a complete store, windows of cfg.frames latent frames
    motion = parse_motion(cfg.retrieve_motion)  # () unless memory is retrieved by pose
    windows = (RetrievalWindows(store, cfg.split, cfg.frames, cfg.retrieve_frames, cfg.cache_shards, motion,
                                cfg.retrieve_radius)
               if cfg.retrieve_frames else LatentWindows(store, cfg.split, cfg.frames, cache_shards=cfg.cache_shards))
    sampler = WindowSampler(windows, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    num_actions = int(store.attrs.get("num_actions", 0)) if cfg.use_actions else 0
    if cfg.use_actions and num_actions == 0:
        raise ValueError(f"--use-actions: store {cfg.store} records no actions")
    if motion and len(motion) < num_actions:
        raise ValueError(f"--retrieve-motion {cfg.retrieve_motion!r} gives {len(motion)} "
                         f"actions' moves; store {cfg.store} has actions up to id {num_actions - 1}")
    lay = store.layout(cfg.split)
    if lay.height % cfg.patch_size or lay.width % cfg.patch_size:
        raise ValueError(f"--patch-size {cfg.patch_size} does not divide the store's {lay.height}x{lay.width} latents")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    module = VideoDiT.from_preset(cfg.model, in_channels=lay.channels, patch_size=cfg.patch_size,
                                  num_actions=num_actions, attention=cfg.attention, short_frames=cfg.short_frames,
                                  memory_pool=cfg.memory_pool)
    module.set_attention_kernel(cfg.attention_kernel)
    if cfg.grad_checkpoint:
        module.enable_gradient_checkpointing()
    if cfg.compile if cfg.compile is not None else (device.type == "cuda" and contract.name != "gemini"):
        module.compile_blocks()  # in place: parameter names (and so checkpoints) stay those of the plain module
    optimizer = plugins.build_optimizer(contract, module, cfg.lr, cfg.weight_decay)
    schedule = lr_lambda(cfg.warmup, cfg.steps, cfg.lr_schedule, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    booster = plugins.build_booster(contract, precision, cfg.grad_clip, cfg.grad_accum)
    model, optimizer, _, _, scheduler = booster.boost(module, optimizer, lr_scheduler=scheduler)
    # after boost: the plugin has put the parameters on their device, and the EMA goes there too
    ema = EMA.of(module, cfg.ema_decay) if rank == 0 and contract.keeps_ema else None
    return Run(cfg, contract, precision, device, store, windows, sampler, model, module, optimizer, scheduler,
               booster, ema, sum(p.numel() for p in module.parameters()))


def pipeline_weights(run: Run) -> dict[str, torch.Tensor]:
    """The weights sampling gets: the EMA, or (Gemini, which keeps none) the gathered weights; call on every rank."""
    if run.ema is not None:
        return run.ema.state_dict()
    if not run.contract.keeps_ema:
        return run.model.state_dict(only_rank_0=True)  # collective: Gemini gathers its chunks
    return {}


def save(run: Run, step: int, loader_state: dict) -> None:
    rank, world, _ = dist_info()
    cfg, weights = run.cfg, pipeline_weights(run)
    state = {"step": step, "loader": loader_state, "scheduler": run.scheduler.state_dict(), "world_size": world,
             "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
             "loss_scaler": plugins.scaler_state(plugins.find_loss_scaler(run.optimizer)), "config": config_json(cfg),
             "store": store_identity(run.store)}

    def rank0_files(tmp: Path) -> None:
        if run.ema is not None:
            save_file({k: v.cpu() for k, v in run.ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        save_run(tmp / "pipeline", run.module, weights, run.store, cfg)

    ckpt.save(run.booster, run.model, run.optimizer, ckpt.step_dir(cfg.out, step), state, rank0_files, rank,
              sharded_optimizer=run.device.type == "cuda", barrier=barrier)
    if rank == 0:
        ckpt.prune(cfg.out, cfg.keep_last)
    barrier()


def resume(run: Run, where: ckpt.Resume) -> tuple[int, dict | None, dict | None]:
    """Load `where`, after moving newer checkpoints aside when branching; honours a changed --lr.

    Returns (step, loader state, the metrics.jsonl event that records where this history continues)."""
    cfg, (rank, world, _) = run.cfg, dist_info()
    state = ckpt.read_state(where.path) if where.path is not None else None
    recipe = check_resume(state, cfg, world, run.store, where.path) if state is not None else {}
    if state is not None:
        ckpt.optimizer_path(where.path)  # an incomplete checkpoint fails here, before anything moves
    abandoned = ckpt.abandon(cfg.out, where.newer, where.step) if rank == 0 else None
    if rank == 0 and state is not None:
        ckpt.rewind_metrics(Path(cfg.out) / "metrics.jsonl", where.step)  # steps past it are logged again
    barrier()
    event = {"event": "branch" if abandoned else "resume", "at_step": where.step,
             "start": str(where.path) if where.path is not None else "scratch"}
    if abandoned:
        event["abandoned"] = str(abandoned)
    if where.skipped:
        event["skipped_damaged"] = list(where.skipped)
    for key, (before, now) in recipe.items():  # allowed, said, and recorded with the resume
        print0(announcement(key, before, now, where.step))
        event.setdefault("recipe_changes", {})[key] = [before, now]
    if state is None:
        return 0, None, event if abandoned else None
    ckpt.load(where.path, run.booster, run.model, run.optimizer, rank)
    run.scheduler.load_state_dict(state["scheduler"])
    plugins.load_scaler_state(plugins.find_loss_scaler(run.optimizer), state.get("loss_scaler"))
    if run.ema is not None:
        file = where.path / "ema.safetensors"
        run.ema.load_state_dict(load_file(str(file), device=str(run.device)), source=str(file))
    old_lr = state.get("lr", state["config"].get("lr"))
    set_peak_lr(run.scheduler, cfg.lr)  # the schedule's shape comes from this run's flags; its peak too
    if old_lr != cfg.lr:
        print0(f"--lr {cfg.lr:g} replaces the checkpoint's {old_lr:g}: from step {where.step} on the schedule "
               f"continues with peak {cfg.lr:g} (lr now {run.scheduler.get_last_lr()[0]:.3g})")
    print0(f"resumed from {where.path} at step {where.step}"
           + (f"; the newer checkpoints moved to {abandoned}" if abandoned else ""))
    return where.step, state["loader"], event


def set_peak_lr(scheduler, lr: float) -> None:
    """Make a LambdaLR loaded from a checkpoint use peak `lr` (its state_dict would restore the old one)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def train_step(run: Run, loader: WindowLoader, step: int, stats: tuple[torch.Tensor, torch.Tensor]):
    """One optimizer step of cfg.grad_accum micro-steps; returns (summed loss, grad norm before clipping or None)."""
    cfg, c, device, rank = run.cfg, run.contract, run.device, dist_info()[0]
    torch.manual_seed(step_seed(cfg.seed, step, rank))  # action dropout etc.
    gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, rank))
    dtype = plugins.autocast_dtype(c, run.precision)
    loss_sum = torch.zeros((), device=device)
    teacher = is_teacher_forcing_step(cfg, step)
    for micro in range(cfg.grad_accum):
        batch = next(loader).to(device)  # non_blocking: overlaps the copy when the loader pinned the batch
        x0 = sample_latents(batch, *stats, gen)  # (B, F, C, h, w) normalised latents
        actions = batch.actions if cfg.use_actions else None
        if teacher:  # every frame noisy (own t), seeing a clean copy of the window before it
            t, t_clean = teacher_forcing_times(x0.shape[0], x0.shape[1], cfg.flow, generator=gen, device=device)
            t, t_clean = plugins.time_as_seen(c, run.precision, t), plugins.time_as_seen(c, run.precision, t_clean)
            context = with_memory(cfg.retrieve_frames, cfg.frames, t)[1]  # None without memory
            clean = x0 if cfg.flow.context_noise == 0 else noisy(x0, torch.randn(x0.shape, generator=gen,
                                                                                device=device), t_clean, cfg.flow.path)
        else:
            t, context = sample_times(x0.shape[0], x0.shape[1], cfg.flow, generator=gen, device=device)
            t, context = with_memory(cfg.retrieve_frames, cfg.frames, t, context)  # memory frames: clean context
            t = plugins.time_as_seen(c, run.precision, t)  # (B, F) fp32, exactly what the model is given
            clean = t_clean = None
        noise = torch.randn(x0.shape, generator=gen, device=device)
        lead = slice(cfg.retrieve_frames if teacher else 0, None)  # memory: context only, no noisy copy to teach
        x0, noise, t, context = x0[:, lead], noise[:, lead], t[:, lead], None if context is None else context[:, lead]
        with plugins.micro_step(run.booster, run.model, run.optimizer, c, last=micro == cfg.grad_accum - 1):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = run.model(noisy(x0, noise, t, cfg.flow.path), t, actions, clean=clean, clean_timesteps=t_clean)
            loss = flow_loss(out.float(), x0, noise, context, t, cfg.flow.path, cfg.flow.prediction) / cfg.grad_accum
            run.booster.backward(loss, run.optimizer)
        loss_sum += loss.detach()
    norm = plugins.clip_and_step(run.optimizer, c, cfg.grad_clip)
    run.optimizer.zero_grad()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.module)
    return loss_sum, norm


class Meter:
    """Loss and throughput over a log interval, kept on the device until `flush` (one host sync)."""

    def __init__(self, device: torch.device):
        self.device, self.last_loss = device, math.nan
        self._reset()

    def _reset(self) -> None:
        self.t0, self.n, self.loss, self.norm = time.time(), 0, torch.zeros((), device=self.device), None

    def add(self, loss: torch.Tensor, norm) -> None:
        self.n, self.loss, self.norm = self.n + 1, self.loss + loss, norm

    def flush(self, run: Run, epoch: int) -> dict:
        cfg, dt, world = run.cfg, time.time() - self.t0, dist_info()[1]
        self.last_loss = float((self.loss / self.n).item())
        metrics = {"loss": self.last_loss, "lr": run.scheduler.get_last_lr()[0], "steps_per_s": self.n / dt,
                   "windows_per_s": self.n * cfg.grad_accum * cfg.batch_size * world / dt, "epoch": epoch}
        if self.norm is not None:
            metrics["grad_norm"] = float(self.norm)  # of the interval's last step, before clipping
        self._reset()
        return metrics


def validate(run: Run, validator: Validator | None, step: int, logger: Logger, bar) -> None:
    """Continue a few held-out clips with the sampling weights (gathered on every rank first, for Gemini)."""
    weights = pipeline_weights(run)
    report = validator(step, weights) if validator is not None else {}
    if report:
        logger.log(step, report)
        bar.write(f"step {step}: validation PSNR {report['val_psnr']:.2f} dB "
                  f"(repeat last frame {report['val_psnr_repeat_last']:.2f} dB)")


# ---------------------------------------------------------------------------------------- main
def main(cfg: TrainConfig) -> dict:
    cfg = replace(cfg, flow=replace(cfg.flow, teacher_forcing=teacher_forcing_share(cfg)))  # recorded resolved
    check_config(cfg)
    device = plugins.launch(cfg.device)
    rank, world, _ = dist_info()
    choice = resolve_precision(cfg.precision, device)
    contract = plugins.check_combination(cfg.plugin, choice.precision, device, cfg.ema_decay)
    if device.type == "cuda":
        enable_tf32()
    where = ckpt.resolve_resume(cfg.resume, cfg.out, cfg.branch)  # refuses to overwrite newer checkpoints

    run = build_run(cfg, contract, choice.precision, device)
    step, loader_state, event = resume(run, where)
    logger = Logger(cfg, enabled=rank == 0)
    if event is not None:
        logger.event(**event)
    loader = WindowLoader(run.sampler, state=loader_state, pin_memory=run.device.type == "cuda")  # copies overlap
    stats = (run.windows.stats_mean.to(device), run.windows.stats_std.to(device))
    if rank == 0:
        (Path(cfg.out) / "config.json").write_text(json.dumps(config_json(cfg), indent=2))
    print0(choice.line())
    print0(f"train: {cfg.model} DiT, {run.params / 1e6:.2f}M parameters; {len(run.windows.usable)} clips in "
           f"{cfg.split}, {run.sampler.batches_per_epoch()} batches/epoch; {world} process(es) x batch "
           f"{cfg.batch_size} x accum {cfg.grad_accum} on {device.type}, plugin {cfg.plugin}, {choice.precision}, "
           f"{cfg.attention} attention ({resolve_kernel(cfg.attention_kernel, device)}){long_short_line(cfg)}"
           f"{memory_line(cfg.retrieve_frames, cfg.retrieve_motion, cfg.retrieve_radius)}")
    validator = Validator(cfg, run.store, run.module, device) if cfg.sample_every > 0 and rank == 0 else None
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train", unit="step")
    run.model.train()
    meter = Meter(device)
    try:
        while step < cfg.steps:
            loss, norm = train_step(run, loader, step, stats)
            step = step + 1
            meter.add(loss, norm)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = meter.flush(run, loader.epoch)  # one host sync per log interval
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", windows_s=f"{metrics['windows_per_s']:.0f}")
            bar.update(1)
            if cfg.ckpt_every > 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                save(run, step, loader.state_dict())
            if cfg.sample_every > 0 and step % cfg.sample_every == 0:
                validate(run, validator, step, logger, bar)
    finally:
        loader.close()
        bar.close()
        logger.close()
    return {"step": step, "loss": meter.last_loss, "params": run.params, "precision": choice.precision,
            "ema_device": str(run.ema.device) if run.ema is not None else None,
            "checkpoints": [str(p) for p in ckpt.list_checkpoints(cfg.out)]}
