"""Each stage-two plugin's contract: precision, gradient clipping, accumulation, EMA and checkpoints.

Plain data without torch, so that `minisora train --help` can print it without importing torch.
Read against ColossalAI 0.5.0's booster/plugin and zero/ sources; minisora.plugins acts on it.
None of it has run on a GPU yet (tests/gpu/ and benchmarks/gpu_check.py and gpu_suite.sh are written for that run).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Contract:
    name: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    precision: str
    clip: str
    accumulate: str
    ema: str
    checkpoint: str
    clips_in_step: bool  # the plugin's optimizer clips inside step() (its max_norm), not clip_grad_by_norm
    no_sync: bool  # micro-steps before the last skip the gradient all-reduce
    keeps_ema: bool  # full parameters on every rank, so rank 0 can keep the EMA
    casts_inputs: bool  # the wrapper casts every float input to the compute dtype (t included)


CONTRACTS: dict[str, Contract] = {c.name: c for c in (
    Contract("ddp", ("cpu", "cuda"), ("fp32", "bf16", "fp16"),
             "fp32 weights; bf16 by torch.autocast; fp16 (CUDA) by autocast + torch GradScaler",
             "booster optimizer clip_grad_by_norm (torch clip_grad_norm_, unscaled first in fp16), before step",
             "booster.no_sync on every micro-step but the last: one all-reduce per optimizer step",
             "fp32, rank 0 only, on its device", "booster model + optimizer (one optimizer file on CPU), "
             "EMA, loss scaler",
             clips_in_step=False, no_sync=True, keeps_ema=True, casts_inputs=False),
    Contract("zero1", ("cuda",), ("fp32", "bf16", "fp16"),
             "bf16/fp16 working weights, fp32 master shards; inputs not cast (t stays fp32)",
             "the plugin's max_norm, inside step() over the sharded gradients",
             "booster.no_sync on every micro-step but the last",
             "fp32, rank 0 only, from the working weights", "sharded model + optimizer, EMA, loss scaler",
             clips_in_step=True, no_sync=True, keeps_ema=True, casts_inputs=False),
    Contract("zero2", ("cuda",), ("fp32", "bf16", "fp16"),
             "bf16/fp16 working weights, fp32 master shards; inputs not cast (t stays fp32)",
             "the plugin's max_norm, inside step() over the sharded gradients",
             "gradients reduce-scattered at every micro-step (ZeRO-2 has no no_sync); correct, more traffic",
             "fp32, rank 0 only, from the working weights", "sharded model + optimizer, EMA, loss scaler",
             clips_in_step=True, no_sync=False, keeps_ema=True, casts_inputs=False),
    Contract("gemini", ("cuda",), ("bf16", "fp16"),
             "bf16/fp16 chunks (fp32 refused: Gemini would silently run fp16); it casts every float input, "
             "so t is rounded to bf16/fp16 before x_t is built from it",
             "the plugin's max_norm, inside step()",
             "enable_gradient_accumulation when --grad-accum > 1",
             "none: Gemini frees the storage of parameters a rank does not hold, so --ema-decay must be 0; "
             "pipeline/ gets the gathered weights", "sharded model + optimizer, gathered weights, loss scaler",
             clips_in_step=True, no_sync=False, keeps_ema=False, casts_inputs=True),
)}
PLUGINS = tuple(CONTRACTS)


def contracts_help() -> str:
    """One sentence per plugin, for `minisora train --help`."""
    return " ".join(f"{c.name} ({'/'.join(c.devices)}; {'/'.join(c.precisions)}): precision: {c.precision}; clip: "
                    f"{c.clip}; accumulate: {c.accumulate}; EMA: {c.ema}; checkpoint: {c.checkpoint}."
                    for c in CONTRACTS.values())
