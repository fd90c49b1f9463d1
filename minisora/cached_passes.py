"""VideoDiT's passes after a KV cache: what a causal model's rollout runs (DiTPipeline, LiveGenerator).

A pass of new frames after cached clean frames (`forward_cached`), and the per-frame cache update (`commit`),
each in two parts: eager preparation in Python (the per-time modulations, remembered by the cache; the RoPE
angles at the cache's position; the mask), then the blocks. On a fixed-shape cache (minisora.kv_cache.KVRing,
a rolling rollout's steady state) `compile_rollout` runs the blocks part compiled: every pass then has the same
shapes and tensors, so each part compiles once. `euler_frame` goes one further: a whole new frame (its Euler steps
and its commit) in one compiled call, each step's pass a nested region compiled once.

A mixin of VideoDiT (minisora.model), which gives the network: `_grid`, `_embed`, `_run_blocks`, `_rope`,
`_long_short`, `_modulations`, `_unpatchify`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minisora.attention import FrameMask, causal_mask
from minisora.blocks import Memory, PatchGrid
from minisora.kv_cache import KVCache, KVRing, RingView

# torch >= 2.8 compiles a region repeated in a graph once (euler_frame's steps); without it a frame would unroll
NESTED_REGIONS = hasattr(torch.compiler, "nested_compile_region")
nested_region = torch.compiler.nested_compile_region if NESTED_REGIONS else (lambda fn: fn)


class CachedPasses:
    """The KV-cache passes of VideoDiT (see the module docstring)."""

    _compiled: tuple | None = None  # compile_rollout's (Euler step, commit, whole frame) passes, then the step region
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
        """torch.compile the passes of a frame-by-frame rolling rollout in its steady state (a full `KVRing`, whose
        shapes never change: each compiles once): an Euler step's, a commit's, and `euler_frame`'s whole frame; the
        passes over a growing `KVCache`, and everything before the blocks (times, RoPE angles, masks), stay eager.
        In place."""
        if self._compiled is None:
            kwargs = {"dynamic": False, **compile_kwargs}
            self._compiled = (*(torch.compile(fn, **kwargs)
                                for fn in (self._pass_cached, self._commit_cached, self._frame_cached)),
                              nested_region(lambda *args: self._step_pass(*args)))  # a function, not a method
        return self

    def euler_frame(self, noise: Tensor, times: Tensor, ring: KVRing, actions: Tensor | None = None) -> Tensor:
        """One new frame of a chunk-1 rolling rollout on a full `KVRing`: the Euler steps of minisora.flow.euler_sample
        (with no context frame: x += (t_next - t) v) along `times`, then its commit (the ring advances), in one
        compiled call (after compile_rollout). The model must predict velocity. A frame pays one call's wrapper
        and dispatch cost instead of steps + 1 (docs/benchmarks.md measures what that saves).

        Args:
            noise: (B, 1, C, H, W) the frame's starting noise.
            times: (steps + 1,) the sampling times from 1 down to 0 (minisora.flow.time_grid).
            ring: the rollout's full cache, of batch B.
            actions: (B, 1) the frame's action, or None.
        Returns: the clean frame (B, 1, C, H, W), float32.
        """
        if not self._compiled or not ring.static:
            raise ValueError("euler_frame runs on a full KVRing of a model after compile_rollout()")
        batch, zero = noise.shape[0], torch.zeros(noise.shape[0], 1, device=noise.device)
        step_mods = [self._cached_modulations(t.expand(batch, 1), actions, ring) for t in times[:-1]]
        grid, commit_mods, cos, sin, _, _ = self._cached_pass(noise, zero, ring, actions)  # a ring: no mask, no memory
        x = self._compiled[2](noise.float(), step_mods, torch.diff(times), commit_mods, cos, sin, ring)
        self._advance(ring, grid, None)
        return x

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

    def _step_pass(self, latents: Tensor, cos: Tensor, sin: Tensor, slot: Tensor, *tensors: Tensor) -> Tensor:
        """An Euler step's pass on a full ring -> velocity (float32), with tensors only for inputs (the modulations,
        then each block's ring keys and values) so that `_frame_cached`'s graph compiles it once for all steps."""
        n, pt, p = len(self.blocks) + 1, self.config.patch_size_t, self.config.patch_size
        mods, kv = tensors[:n], tensors[n:]
        grid = PatchGrid(latents.shape[1] // pt, latents.shape[3] // p, latents.shape[4] // p)
        return self._pass_cached(latents, grid, list(mods), cos, sin, None, RingView(list(kv), slot), False,
                                 None).float()

    def _frame_cached(self, x: Tensor, step_mods: list[list[Tensor]], dt: Tensor, commit_mods: list[Tensor],
                      cos: Tensor, sin: Tensor, ring: KVRing) -> Tensor:
        """`euler_frame`'s steps and commit (compiled as one graph; `_compiled[3]` is `_step_pass` as a region)."""
        kv = [t for pair in zip(ring.k, ring.v) for t in pair]
        for i, mods in enumerate(step_mods):
            x = x + dt[i] * self._compiled[3](x, cos, sin, ring.slot, *mods, *kv)
        self._commit_cached(x, commit_mods, cos, sin, None, ring, None)
        return x

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
