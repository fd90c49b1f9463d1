"""The memory-answerable split of an evaluation's generated frames, defined on ground-truth pixels.

With K context frames, a target frame t >= K is *memory-answerable* when some earlier context frame
j < K - 1 matches the ground-truth frame t better (lower MSE) than the last context frame K - 1 does,
by more than a margin in dB (`margin_db`): a model that remembers the whole context could answer it
better than any copy of the latest frame. `margin_db` = 0 is the bare definition; `minisora eval` uses
EvalConfig.memory_margin_db (6 dB: a quarter of the MSE), because far from the last context frame one
of many earlier frames is slightly closer by chance: at 144 -> 156 on the plain `walk` family 95% of
frames pass at 0 dB and 5% at 6 dB, against 97% and 68% on the `revisit` family (docs/design-notes.md).
The rest are frames where the latest context frame is the best context frame there is (new views, or
views the last frame already shows). Ties go to the rest (strictly better is needed), so a still
camera, whose earlier frames equal the last one, is never memory-answerable; with K = 1 there is no
earlier frame and no frame is answerable.

Defined on pixels only, so it works on any dataset; the split depends on the ground truth alone, so
every method and baseline is scored on the same frames. `split_scores` gives each subset's PSNR of
the mean MSE and mean per-frame PSNR and SSIM; a subset with no frames gets None for each (null in
JSON) and `frames` 0, never a made-up number.

Frames are `pixels` shaped (B, T, 3, H, W), float in [0, 1], as in `minisora.metrics`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from minisora.metrics import psnr_of_mean_mse, summarize_seeds


def context_match_mse(video: np.ndarray | Tensor, context: int) -> tuple[Tensor, Tensor]:
    """(best earlier, last): for each target frame K..T-1 of (B, T, H, W, 3) uint8 ground truth (K = `context`),
    the lowest MSE to it among context frames 0..K-2 (+inf when K = 1) and the MSE to context frame K-1,
    each (B, T - K) float64, in uint8 levels squared.

    Exact: integer pixels make every sum of squares an integer below 2^53, so float64 matrix products
    give it without rounding, in any summation order; identical frames tie exactly."""
    v = torch.as_tensor(np.ascontiguousarray(video))
    if v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3 or not 1 <= context < v.shape[1]:
        raise ValueError(f"the memory split needs uint8 frames (B, T, H, W, 3) and 1 <= context < T, got "
                         f"{v.dtype} {tuple(v.shape)} and context {context}")
    best, last = [], []
    for clip in v:  # one clip at a time bounds memory at one clip's frames in float64
        flat = clip.reshape(clip.shape[0], -1).double()  # (T, H, W, 3) -> (T, D), integers 0..255
        sq = flat.pow(2).sum(dim=1)  # (T,)
        sse = sq[:context, None] + sq[None, context:] - 2 * flat[:context] @ flat[context:].T  # (K, T-K), exact
        mse = sse / flat.shape[1]
        best.append(mse[: context - 1].min(dim=0).values if context > 1 else torch.full_like(mse[0], float("inf")))
        last.append(mse[context - 1])
    return torch.stack(best), torch.stack(last)  # (B, T - K) each


def memory_answerable(video: np.ndarray | Tensor, context: int, margin_db: float = 0.0) -> Tensor:
    """Bool (B, T - K) mask over target frames K..T-1 of (B, T, H, W, 3) uint8 ground truth (K = `context`):
    True where some context frame j < K - 1 has a lower MSE to the frame than context frame K - 1, by more
    than `margin_db` dB (best * 10^(margin_db / 10) < last; 0: strictly lower)."""
    best, last = context_match_mse(video, context)
    return best * 10 ** (margin_db / 10) < last


def _subset(errors: dict[str, Tensor], mask: Tensor) -> dict:
    """PSNR of the mean MSE and mean per-frame PSNR and SSIM over the frames where `mask` is True
    (errors (..., B, T), mask (B, T) broadcast over leading dimensions)."""
    mask = mask.expand_as(errors["mse"])
    n = int(mask.sum())
    if n == 0:
        return {"frames": 0, "psnr_mse": None, "psnr": None, "ssim": None}
    return {"frames": n, "psnr_mse": psnr_of_mean_mse(errors["mse"][mask]),
            "psnr": float(errors["psnr"][mask].double().mean()), "ssim": float(errors["ssim"][mask].double().mean())}


def split_scores(errors: dict[str, Tensor], mask: Tensor) -> dict:
    """{"memory": scores on memory-answerable frames, "rest": on the others} from `frame_errors` output
    (each (B, T)) and a `memory_answerable` mask (B, T); see `_subset` for the fields."""
    return {"memory": _subset(errors, mask), "rest": _subset(errors, ~mask)}


def split_over_seeds(per_seed_errors: list[dict[str, Tensor]], mask: Tensor) -> dict:
    """`split_scores` for a sampled model: each number as {"mean", "std", "n"} over seeds (None where the
    subset has no frames)."""
    per_seed = [split_scores(e, mask) for e in per_seed_errors]
    out = {}
    for part in ("memory", "rest"):
        first = per_seed[0][part]
        out[part] = {"frames": first["frames"]}
        for k in ("psnr_mse", "psnr", "ssim"):
            out[part][k] = None if first[k] is None else summarize_seeds([s[part][k] for s in per_seed])
    return out


def answerable_share(mask: Tensor) -> float:
    """The share of target frames that are memory-answerable (0 for an empty mask)."""
    return float(mask.double().mean()) if mask.numel() else 0.0


__all__ = ["answerable_share", "context_match_mse", "memory_answerable", "split_over_seeds", "split_scores"]
