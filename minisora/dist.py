"""Rank helpers. Everything distributed stays here and in the stages; model/flow code never imports it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank), from torch.distributed or torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return dist_info()[0] == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def init_distributed(backend: str = "gloo") -> None:
    """Join the process group when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_device(device: str) -> torch.device:
    """`auto` -> this process's GPU (cuda:LOCAL_RANK) when CUDA is there, else the CPU; otherwise checked as given."""
    if device == "auto":
        return torch.device("cuda", dist_info()[2]) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         f"use --device cpu")
    return dev
