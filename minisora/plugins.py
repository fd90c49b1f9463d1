"""ColossalAI plugins for stage two, each with a written contract, and the launch that picks the device.

Every plugin says, for precision, gradient clipping, gradient accumulation, EMA and checkpoints,
what it does (read against ColossalAI 0.5.0's booster/plugin and zero/ sources). `minisora train
--help` prints these contracts, `check_combination` refuses what cannot work, and the training step
(stages/train.py) calls only the helpers below, so the rules live in one place. None of this has
run on a GPU yet (tests/gpu/ and benchmarks/gpu_check.py and gpu_suite.sh are written for that run).
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext

import torch

from minisora.contracts import CONTRACTS, PLUGINS, Contract

# torch's GradScaler and Gemini start fp16 here; from LowLevelZeroPlugin's 2**32, ZeRO would skip 17 steps (one to
# use up hysteresis 2, then one per halving) just to come down to it
INITIAL_LOSS_SCALE = 2.0**16
# the torchrun variables `launch` sets for a world of one (and torchrun sets for each of its processes)
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_combination(plugin: str, precision: str, device: torch.device, ema_decay: float) -> Contract:
    """The plugin's contract, or a clear error for a combination that cannot work."""
    if plugin not in CONTRACTS:
        raise ValueError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGINS)}")
    c = CONTRACTS[plugin]
    if device.type not in c.devices:
        cls = "GeminiPlugin and HybridAdam have" if plugin == "gemini" else "LowLevelZeroPlugin has"
        raise RuntimeError(f"--plugin {plugin} needs CUDA GPUs (ColossalAI's {cls} no CPU implementation); "
                           "on CPU use --plugin ddp")
    if precision == "fp16" and device.type != "cuda":
        raise RuntimeError("--precision fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    if precision not in c.precisions:
        raise RuntimeError(f"--plugin {plugin} cannot train in {precision} (ColossalAI's GeminiPlugin would run fp16 "
                           f"instead); use --precision {' or '.join(c.precisions)}, or --plugin zero2 for fp32")
    if not c.keeps_ema and ema_decay > 0:
        raise RuntimeError(f"--plugin {plugin} keeps no EMA (Gemini frees the storage of the parameters a rank does "
                           f"not hold, so an EMA would read freed memory): pass --ema-decay 0 to sample with the "
                           "trained weights, or use --plugin zero2")
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(device: str) -> torch.device:
    """Join (or, as one process, create) the process group through ColossalAI, on the device asked for.

    ColossalAI picks its accelerator (and so the backend and where plugins put the model) from what
    it detects; setting it first makes `--device cpu` train on the CPU with gloo on a CUDA machine.
    """
    import colossalai
    import torch.distributed as dist
    from colossalai.accelerator import set_accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: use auto, cpu or cuda (one GPU per process: cuda:LOCAL_RANK)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu")
    if not dist.is_initialized():
        set_accelerator("cuda" if use_cuda else "cpu")
        if "RANK" not in os.environ:  # plain `minisora train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        colossalai.launch_from_torch(backend="nccl" if use_cuda else "gloo", seed=0, verbose=False)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def fresh_world_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without the torchrun variables, for a child process that must be a world of one of its own: given
    its parent's MASTER_PORT, its rank 0 would try to listen where the parent's store listens (EADDRINUSE)."""
    return {k: v for k, v in env.items() if k not in TORCHRUN_VARS}


def build_plugin(c: Contract, precision: str, grad_clip: float, grad_accum: int):
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    if c.name == "ddp":
        plugin = TorchDDPPlugin(find_unused_parameters=False)
        # the plugin always passes DDP broadcast_buffers=True, which torch 2.13 deprecates (a FutureWarning);
        # DDP without it does the same in every torch (2.11: its default True; 2.13: synced at init and each forward)
        plugin.ddp_kwargs.pop("broadcast_buffers")
        return plugin
    if c.name in ("zero1", "zero2"):
        return LowLevelZeroPlugin(stage=int(c.name[-1]), precision=precision, max_norm=grad_clip, cast_inputs=False,
                                  initial_scale=INITIAL_LOSS_SCALE)
    return GeminiPlugin(precision=precision, placement_policy="static", max_norm=grad_clip,
                        enable_gradient_accumulation=grad_accum > 1, initial_scale=INITIAL_LOSS_SCALE)


def build_booster(c: Contract, precision: str, grad_clip: float, grad_accum: int):
    """The Booster; only ddp in fp16 takes ColossalAI's mixed precision (autocast + GradScaler)."""
    from colossalai.booster import Booster

    mixed = "fp16" if (c.name == "ddp" and precision == "fp16") else None
    return Booster(plugin=build_plugin(c, precision, grad_clip, grad_accum), mixed_precision=mixed)


def build_optimizer(c: Contract, model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW. ZeRO wraps any torch optimizer, so ddp/zero1/zero2 take torch's (no kernels to JIT-build, which
    takes minutes and needs nvcc); Gemini accepts only ColossalAI's HybridAdam/FusedAdam/CPUAdam."""
    if c.name == "gemini":
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam(model.parameters(), lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def autocast_dtype(c: Contract, precision: str) -> torch.dtype | None:
    """The dtype the training step autocasts to: only ddp in bf16 (fp16 is ColossalAI's; ZeRO/Gemini cast weights)."""
    return torch.bfloat16 if (c.name == "ddp" and precision == "bf16") else None


def time_as_seen(c: Contract, precision: str, t: torch.Tensor) -> torch.Tensor:
    """`t` as the model will receive it: rounded to the compute dtype where the wrapper casts inputs (Gemini),
    so that x_t is built from the same t the model is told."""
    if c.casts_inputs and precision in ("bf16", "fp16"):
        return t.to(torch.bfloat16 if precision == "bf16" else torch.float16).float()
    return t


def micro_step(booster, model, optimizer, c: Contract, last: bool):
    """The context of one micro-step: no gradient sync before the last one where the plugin supports it."""
    return booster.no_sync(model, optimizer) if (c.no_sync and not last) else nullcontext()


def clip_and_step(optimizer, c: Contract, max_norm: float):
    """Clip (through the plugin's own path) and step; returns the gradient norm before clipping (a tensor), or
    None where ZeRO/Gemini computed none."""
    if c.clips_in_step:  # ZeRO / Gemini: max_norm was given to the plugin; the norm is known after step()
        optimizer.step()
        norm, scaler = optimizer.get_grad_norm(), find_loss_scaler(optimizer)
        # their norm is of the loss-scaled gradients (fp16); a tensor division keeps it free of host syncs
        return norm / scaler.scale if scaler is not None and norm is not None else norm
    norm = _clip_booster_grads(optimizer, max_norm)
    optimizer.step()
    return norm


def _clip_booster_grads(optimizer, max_norm: float) -> torch.Tensor:
    """Clip the booster optimizer's gradients to max_norm (none when max_norm <= 0); returns their norm before.

    This is what TorchAMPOptimizer.clip_grad_by_norm (ddp in fp16) does, unscale then the OptimizerWrapper
    clip, but keeping the norm it drops. Unscaled once: GradScaler.unscale_ refuses a second call before
    update(), and its step() then leaves the gradients as they are."""
    from colossalai.booster.mixed_precision.fp16_torch import TorchAMPOptimizer
    from colossalai.interface import OptimizerWrapper

    if isinstance(optimizer, TorchAMPOptimizer):
        optimizer.unscale_grad()
    if max_norm > 0:
        return OptimizerWrapper.clip_grad_by_norm(optimizer, max_norm)  # torch clip_grad_norm_ over its params
    grads = [p.grad for p in optimizer.parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


# ------------------------------------------------------------------------------ loss scaler
def find_loss_scaler(optimizer):
    """The fp16 loss scaler behind a boosted optimizer (torch GradScaler for ddp, ColossalAI's for ZeRO/Gemini)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None:
        return scaler
    mixin = getattr(optimizer, "mixed_precision_mixin", None) or getattr(optimizer, "mix_precision_mixin", None)
    return getattr(mixin, "grad_scaler", None)


def scaler_state(scaler) -> dict | None:
    """JSON-ready state of a loss scaler (None when there is none or it is disabled)."""
    if scaler is None:
        return None
    if isinstance(scaler, torch.amp.GradScaler):
        state = scaler.state_dict()
        return {"kind": "torch", **state} if state else None
    return {"kind": "colossalai", "scale": float(scaler.scale.item()), "growth_step": scaler._growth_step,
            "hysteresis_step": scaler._hysteresis_step}


def load_scaler_state(scaler, state: dict | None) -> None:
    """Restore what scaler_state saved (a checkpoint without one leaves the scaler as it starts)."""
    if state is None or scaler is None:
        return
    state = dict(state)
    if state.pop("kind") == "torch":
        scaler.load_state_dict(state)
    else:
        scaler._scale = torch.tensor([state["scale"]], dtype=torch.float32, device=scaler.scale.device)
        scaler._growth_step, scaler._hysteresis_step = state["growth_step"], state["hysteresis_step"]
