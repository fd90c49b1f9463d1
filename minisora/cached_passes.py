"""VideoDiT's passes after a KV cache: what a causal model's rollout runs (DiTPipeline, LiveGenerator).

A pass of new frames after cached clean frames (`forward_cached`), and the per-frame cache update (`commit`),
each in two parts: eager preparation in Python (the per-time modulations, remembered by the cache; the RoPE
angles at the cache's position; the mask), then the blocks. On a fixed-shape cache (minisora.kv_cache.KVRing,
a rolling rollout's steady state) `compile_rollout` runs the blocks part compiled: every pass then has the same
shapes and tensors, so each part compiles once.

A mixin of VideoDiT (minisora.model), which gives the network: `_grid`, `_embed`, `_run_blocks`, `_rope`,
`_long_short`, `_modulations`, `_unpatchify`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minisora.attention import FrameMask, causal_mask
from minisora.blocks import Memory, PatchGrid
from minisora.kv_cache import KVCache


class CachedPasses:
    """The KV-cache passes of VideoDiT (see the module docstring)."""

    _compiled: tuple | None = None  # compile_rollout's (Euler step, commit) passes
    _conditioning_layers: list | None = None  # `_conditioning_parameters`' modules, listed on first use

    def forward_cached(self, latents: Tensor, timesteps: Tensor, kv_cache: KVCache, actions: Tensor | None = None,
                       update_cache: bool = False) -> Tensor:
        """A causal pass of frames after the cached clean frames, at frame positions kv_cache.position on.

        Args:
            latents: (B, T, C, H, W) the frames after the cached ones.
            timesteps: (B, T) their times in [0, 1].
            kv_cache: the cache of this rollout; its batch must be B.
            actions: (B, T) or None, as for `forward`.
            update_cache: append these frames' keys and values and advance the cache (give clean frames, t = 0).
        """
        grid, mods, cos, sin, mask, memory = self._cached_pass(latents, timesteps, kv_cache, actions)
        out = self._passes(kv_cache)[0](latents, grid, mods, cos, sin, mask, kv_cache, update_cache, memory)
        if update_cache:
            self._advance(kv_cache, grid, memory)
        return out

    def commit(self, latents: Tensor, timesteps: Tensor, kv_cache: KVCache, actions: Tensor | None = None) -> None:
        """Append clean frames to kv_cache: `forward_cached(update_cache=True)` without its velocity, so the last
        block computes only its keys and values (no attention, no MLP) and the output layer does not run; the cache
        ends up the same. What a rollout does with each frame it has generated (DiTPipeline, LiveGenerator).

        Args: as `forward_cached`; give clean frames (t = 0)."""
        grid, mods, cos, sin, mask, memory = self._cached_pass(latents, timesteps, kv_cache, actions)
        self._passes(kv_cache)[1](latents, mods, cos, sin, mask, kv_cache, memory)
        self._advance(kv_cache, grid, memory)

    def compile_rollout(self, **compile_kwargs) -> "CachedPasses":
        """torch.compile the two passes of a frame-by-frame rolling rollout in its steady state (a full `KVRing`,
        whose shapes never change: each compiles once), an Euler step's and a commit's; the passes over a growing
        `KVCache`, and everything before the blocks (times, RoPE angles, masks), stay eager. In place."""
        if self._compiled is None:
            kwargs = {"dynamic": False, **compile_kwargs}
            self._compiled = (torch.compile(self._pass_cached, **kwargs), torch.compile(self._commit_cached, **kwargs))
        return self

    def __getstate__(self) -> dict:
        """Copies and pickles leave the compiled passes behind: they are bound to this model (a deep copy that kept
        them would run this model's weights); a copy compiles its own on its first compile_rollout."""
        state = dict(super().__getstate__())
        state.pop("_compiled", None)
        return state

    def _passes(self, kv_cache: KVCache) -> tuple:
        """(Euler step pass, commit pass) for kv_cache: the compiled ones on a fixed-shape cache (compile_rollout)."""
        return self._compiled if kv_cache.static and self._compiled else (self._pass_cached, self._commit_cached)

    def _pass_cached(self, latents: Tensor, grid: PatchGrid, mods: list[Tensor], cos: Tensor, sin: Tensor,
                     mask: FrameMask | None, kv_cache: KVCache, update_cache: bool, memory: Memory | None) -> Tensor:
        """The blocks and the output of a pass after kv_cache's frames -> velocity (B, T, C, H, W)."""
        x = self._run_blocks(self._embed(latents), mods, cos, sin, mask, kv_cache, update_cache, memory)
        return self._unpatchify(self.final_layer(x, mods[-1]), grid)

    def _commit_cached(self, latents: Tensor, mods: list[Tensor], cos: Tensor, sin: Tensor, mask: FrameMask | None,
                       kv_cache: KVCache, memory: Memory | None) -> None:
        """The blocks of a committing pass up to the last block's keys and values (see `commit`)."""
        x = self._embed(latents)
        *first, last = self.blocks
        for i, block in enumerate(first):
            x = block(x, mods[i], cos, sin, mask, kv_cache, i, True, memory)
        last.store(x, mods[len(first)], cos, sin, kv_cache, len(first), memory)

    def _cached_pass(self, latents: Tensor, timesteps: Tensor, kv_cache: KVCache | None, actions: Tensor | None):
        """(grid, modulations, RoPE cos, sin, mask, memory) of a pass after kv_cache's frames."""
        grid = self._grid(latents, timesteps)
        self._require_causal("a KV cache needs")
        if kv_cache is None:
            raise ValueError("update_cache=True needs a kv_cache")
        mods, device = self._cached_modulations(timesteps, actions, kv_cache), latents.device
        cos, sin = self._rope(grid, kv_cache.position, device)
        if self.config.short_frames:
            mask, memory = self._long_short(grid, device, kv_cache.memory_frames, kv_cache.frames, grid.frames,
                                            offset=kv_cache.position, cached=True)
        else:
            mask = causal_mask(kv_cache.frames, grid.frames, grid.height * grid.width, device, self.attention_kernel)
            memory = None
        return grid, mods, cos, sin, mask, memory

    def _advance(self, kv_cache: KVCache, grid: PatchGrid, memory: Memory | None) -> None:
        """After a committing pass: move the cache's position on (and keep the full keys a next query can see)."""
        pool = self.config.memory_pool
        kv_cache.advance(grid.frames, grid.height * grid.width,
                         (grid.height // pool) * (grid.width // pool) if memory is not None else 0)
        if memory is not None:  # full keys only where a next query frame can see them
            kv_cache.keep_full(self.config.short_frames - 1)

    def _cached_modulations(self, timesteps: Tensor, actions: Tensor | None, kv_cache: KVCache) -> list[Tensor]:
        """`_modulations`, remembered by kv_cache: every frame of a rollout steps through the same times (and a
        commit's t = 0), so its passes compute each (times, actions) pair's modulations once. The key holds the
        conditioning weights' versions, so changed weights are never served old values. Not in training (action
        dropout) nor with gradients, and on the CPU only: elsewhere the key would cost a host sync per pass."""
        if self.training or torch.is_grad_enabled() or timesteps.device.type != "cpu":
            return self._modulations(timesteps, actions)
        weights = tuple((p.data_ptr(), p._version) for p in self._conditioning_parameters())
        key = (id(self), weights, timesteps.shape, tuple(timesteps.flatten().tolist()),
               None if actions is None else tuple(actions.flatten().tolist()))
        return kv_cache.remember(key, lambda: self._modulations(timesteps, actions))

    def _conditioning_parameters(self) -> list[nn.Parameter]:
        """The parameters of the conditioning's layers, read from their modules at each call (a parameter set anew
        is seen); the modules are listed once (`Module.parameters()` walks the tree: ~0.1 ms, per pass)."""
        if self._conditioning_layers is None:
            modules = [self.time_embed, self.action_embed, *(b.adaLN_modulation for b in self.blocks),
                       self.final_layer.adaLN_modulation]
            self._conditioning_layers = [layer for m in modules if m is not None for layer in m.modules()]
        return [p for layer in self._conditioning_layers for p in layer._parameters.values() if p is not None]
