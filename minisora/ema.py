"""Exponential moving average of the weights that sampling uses: ema <- ema + (1 - decay) (param - ema).

The EMA lives on the parameters' own device (built after `booster.boost` has moved them there), in
fp32 whatever the parameters' dtype, and is updated with one fused `torch._foreach_lerp_` per step
instead of a Python loop of lerps. Which ranks keep one is the plugin's contract (minisora.dist):
with full parameters on every rank (ddp, zero1, zero2) only rank 0 keeps it, since only rank 0
saves and validates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class EMA:
    """fp32 shadow copies of named parameters, on the device of each parameter."""

    def __init__(self, params: Iterable[tuple[str, Tensor]], decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        named = [(name, p) for name, p in params]
        self.names = [name for name, _ in named]
        self.shadow = [p.detach().to(torch.float32, copy=True) for _, p in named]

    @classmethod
    def of(cls, model: nn.Module, decay: float) -> "EMA":
        """The EMA of `model`'s parameters where they are now: call it after booster.boost moved them."""
        return cls(model.named_parameters(), decay)

    @property
    def device(self) -> torch.device:
        return self.shadow[0].device

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused lerp of every shadow tensor toward the model's current parameters."""
        params = [p.detach() for _, p in model.named_parameters()]
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors but the model has {len(params)} parameters")
        if params and params[0].device != self.device:
            raise RuntimeError(f"EMA lives on {self.device} but the parameters are on {params[0].device}: build it "
                               "with EMA.of(model) after booster.boost has placed the model")
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """name -> fp32 tensor (contiguous, ready for safetensors)."""
        return {name: t.contiguous() for name, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], source: str = "EMA state") -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} of the model's parameters (first: {missing[0]}); "
                             "it was written for another model")
        for name, t in zip(self.names, self.shadow):
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model {tuple(t.shape)}")
            t.copy_(state[name])
