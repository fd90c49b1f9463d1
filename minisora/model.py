"""The video Diffusion Transformer: latents (B, T, C, H, W) + per-frame times (+ actions) -> velocity.

A DiT (Peebles & Xie) lifted to video:
- 3D patches (temporal patch 1 by default, so any frame count works and any frame can be context);
- 3D rotary position embedding over (frame, row, column), computed for the actual T, H, W at forward
  time, so there is no maximum length and attention only sees relative positions;
- adaLN-Zero modulation **per frame**: the conditioning c (B, T, D) is the embedding of that frame's
  t (plus that frame's action) and modulates only that frame's tokens; all gates and the output
  layer start at zero, so a fresh model predicts zero velocity;
- q/k RMSNorm and attention over all T*h*w tokens: bidirectional (attention="full") or frame-causal
  (attention="causal": a token sees its own frame and earlier frames only), in which case a rollout
  can reuse clean frames' keys and values (minisora.kv_cache). A causal model with short_frames > 0
  attends long-short (minisora.blocks): full tokens of the last short_frames frames, and of older
  frames only their keys and values pooled memory_pool x memory_pool (0, the default: every frame
  full). The kernel (SDPA or FlexAttention) is a runtime choice, `set_attention_kernel`, not part
  of the saved config (minisora.attention).

A diffusers ModelMixin + ConfigMixin, so `save_pretrained`/`from_pretrained` and
`enable_gradient_checkpointing()` work as for any diffusers model. Its passes after a KV cache
(`forward_cached`, `commit`, `compile_rollout`) are minisora.cached_passes's mixin.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from minisora.attention import (KERNELS, FrameMask, LongShort, causal_mask, long_short_mask, teacher_forcing_mask,
                                uncached_when_compiling)
from minisora.blocks import DiTBlock, FinalLayer, Memory, PatchGrid, apply_rope, rope_angles, rope_cos_sin  # noqa: F401
from minisora.cached_passes import CachedPasses
from minisora.kv_cache import KVCache

ATTENTION_MODES = ("full", "causal")


# Sizes follow DiT (S/B/L/XL); "tiny" is for CPU demos and tests of the whole pipeline.
DIT_MODEL_SPECS: dict[str, dict] = {
    "tiny": dict(hidden_size=192, depth=4, num_heads=3),
    "small": dict(hidden_size=384, depth=12, num_heads=6),
    "base": dict(hidden_size=768, depth=12, num_heads=12),
    "large": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
}


class VideoDiT(CachedPasses, ModelMixin, ConfigMixin):
    """Velocity model v(x_t, t, actions) for flow matching on video latents (see minisora.flow)."""

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["DiTBlock"]  # what diffusers' compile_repeated_blocks compiles (compile_blocks)

    @register_to_config
    def __init__(self, in_channels: int = 4, patch_size: int = 2, patch_size_t: int = 1, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_actions: int = 0,
                 action_dropout: float = 0.1, rope_theta: float = 10000.0, frequency_dim: int = 256,
                 timestep_scale: float = 1000.0, attention: str = "full", short_frames: int = 0, memory_pool: int = 2):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if short_frames < 0 or memory_pool < 1:
            raise ValueError(f"short_frames must be >= 0 and memory_pool >= 1, got {short_frames} and {memory_pool}")
        if short_frames and attention != "causal":
            raise ValueError(f"short_frames {short_frames} (long-short attention) needs attention='causal', "
                             f"got {attention!r}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
        if not 0.0 <= action_dropout <= 1.0:
            raise ValueError(f"action_dropout must be in [0, 1], got {action_dropout}")
        patch_dim = patch_size_t * patch_size * patch_size * in_channels
        self.patch_embed = nn.Linear(patch_dim, hidden_size)
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(frequency_dim, hidden_size)
        # index num_actions is the learned "null" action (no action / dropped for classifier-free guidance)
        self.action_embed = nn.Embedding(num_actions + 1, hidden_size) if num_actions > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_dim)
        self.gradient_checkpointing = False
        self.attention_kernel = "auto"  # a runtime choice (set_attention_kernel), not saved with the weights
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():  # DiT's initialisation
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        if self.action_embed is not None:
            # near the scale of a trained timestep embedding (norm ~5-8), not DiT's 0.02 for class labels, so the
            # actions are not drowned out by the time signal (the experiment: docs/design-notes.md)
            nn.init.normal_(self.action_embed.weight, std=0.5)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VideoDiT":
        if name not in DIT_MODEL_SPECS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(DIT_MODEL_SPECS)}")
        return cls(**{**DIT_MODEL_SPECS[name], **overrides})

    @property
    def param_dtype(self) -> torch.dtype:
        """The weights' dtype (diffusers' `dtype` walks every module: a rollout step asks twice per pass)."""
        return self.patch_embed.weight.dtype

    def set_attention_kernel(self, kernel: str) -> "VideoDiT":
        """Attend with `kernel`: "sdpa", "flex" or "auto" (flex on CUDA, SDPA elsewhere); see minisora.attention."""
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.attention_kernel = kernel
        return self

    def compile_blocks(self, **compile_kwargs) -> "VideoDiT":
        """torch.compile each transformer block in place (diffusers' regional compilation): the blocks share one
        graph, so a model compiles in the time of one block, and masks, RoPE angles and the KV cache stay eager
        Python around them. Parameter names (and so checkpoints) are those of the plain module."""
        self.compile_repeated_blocks(**{"dynamic": False, **compile_kwargs})
        return self

    def condition(self, timesteps: Tensor, actions: Tensor | None = None) -> Tensor:
        """Per-frame conditioning c (B, T, D) from times (B, T) and actions (B, T) (None or < 0 -> null)."""
        batch, frames = timesteps.shape
        t_freq = self.time_proj(timesteps.float().flatten() * self.config.timestep_scale)  # (B*T, frequency_dim)
        c = self.time_embed(t_freq.to(self.param_dtype)).unflatten(0, (batch, frames))  # "(b t) d -> b t d"
        if self.action_embed is None:
            if actions is not None:
                raise ValueError("actions were given but this model has num_actions=0")
            return c
        null = self.config.num_actions
        if actions is None:
            actions = torch.full((batch, frames), null, dtype=torch.long, device=c.device)
        elif actions.shape != (batch, frames):
            raise ValueError(f"actions {tuple(actions.shape)} must be (B, T) = {(batch, frames)}")
        actions = torch.where(actions < 0, null, actions.long())
        if self.training and self.config.action_dropout > 0:  # drop a whole sample's actions at once
            drop = torch.rand(batch, device=c.device) < self.config.action_dropout  # (B,)
            actions = torch.where(drop[:, None], null, actions)
        return c + self.action_embed(actions)

    def forward(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None = None,
                kv_cache: KVCache | None = None, update_cache: bool = False, clean: Tensor | None = None,
                clean_timesteps: Tensor | None = None) -> Tensor:
        """Velocity (B, T, C, H, W) by the pass the arguments pick (the entry point of callers and DDP wrappers).

        Args:
            latents: (B, T, C, H, W) noisy latents; T, H, W divisible by the patch.
            timesteps: (B, T) each frame's time in [0, 1] (0 = clean, 1 = noise).
            actions: (B, T) int in [0, num_actions), or None / negative entries for the learned null action
                (classifier-free guidance); in train mode a sample's actions all become null with p = action_dropout.
            kv_cache: causal models only: these frames follow the cached clean frames (`forward_cached`).
            update_cache: with kv_cache: also append these frames' keys and values (give clean frames, t = 0).
            clean: (B, M + T, C, H, W), causal models only, no kv_cache: this clean copy, M >= 0 context-only
                frames first (`forward_teacher_forcing`).
            clean_timesteps: (B, M + T) the clean copy's times (default 0); only with clean.
        """
        if clean is not None:
            if kv_cache is not None or update_cache:
                raise ValueError("teacher forcing (clean=...) runs without a kv_cache")
            return self.forward_teacher_forcing(latents, timesteps, clean, actions, clean_timesteps)
        if clean_timesteps is not None:
            raise ValueError("clean_timesteps are the times of a clean copy: pass clean=... too")
        if kv_cache is not None or update_cache:
            return self.forward_cached(latents, timesteps, kv_cache, actions, update_cache)
        return self.forward_plain(latents, timesteps, actions)

    def forward_plain(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None = None) -> Tensor:
        """One pass over the window, with the model's attention (full, or frame-causal from frame 0).

        Args:
            latents: (B, T, C, H, W) noisy latents.
            timesteps: (B, T) each frame's time in [0, 1].
            actions: (B, T) or None, as for `forward`.
        """
        grid = self._grid(latents, timesteps)
        x, mods = self._embed(latents), self._modulations(timesteps, actions)
        cos, sin = self._rope(grid, 0, x.device)
        mask, memory = None, None
        if self.config.short_frames:
            mask, memory = self._long_short(grid, x.device, memory_frames=0, full_frames=0, new_frames=grid.frames)
        elif self.config.attention == "causal":
            mask = causal_mask(0, grid.frames, grid.height * grid.width, x.device, self.attention_kernel)
        x = self._run_blocks(x, mods, cos, sin, mask, memory=memory)
        return self._unpatchify(self.final_layer(x, mods[-1]), grid)

    def forward_teacher_forcing(self, latents: Tensor, timesteps: Tensor, clean: Tensor,
                                actions: Tensor | None = None, clean_timesteps: Tensor | None = None) -> Tensor:
        """Velocity (B, T, C, H, W) of the noisy frames `latents` from one pass over the clean copy `clean` (B, M + T,
        C, H, W) of the window, then the noisy frames: noisy frame i (times `timesteps` (B, T)) sees clean frames
        < M + i and itself, a chunk-1 rollout's view; M > 0 context-only frames (retrieved memory) get no noisy
        copy. `actions` (B, M + T) or None (as for `forward`) and `clean_timesteps` (B, M + T) (None: 0) are the
        clean copy's."""
        self._require_causal("teacher forcing (clean=...) needs")
        self._grid(latents, timesteps)
        lead, pt = clean.shape[1] - latents.shape[1], self.config.patch_size_t  # M context-only frames
        if clean.ndim != 5 or lead < 0 or clean.shape[:1] + clean.shape[2:] != latents.shape[:1] + latents.shape[2:]:
            raise ValueError(f"clean {tuple(clean.shape)} must match latents {tuple(latents.shape)} (or have "
                             "more frames: context-only frames before them)")
        if lead % pt or (lead and self.config.short_frames):
            raise ValueError(f"teacher forcing: {lead} context-only frames need a multiple of patch_size_t {pt} "
                             "and no long-short attention (short_frames 0)")
        clean_t = timesteps.new_zeros(clean.shape[:2]) if clean_timesteps is None else clean_timesteps
        for name, value in (("clean_timesteps", clean_t), ("actions", actions)):
            if value is not None and value.shape != clean.shape[:2]:
                raise ValueError(f"{name} {tuple(value.shape)} must be (B, T) of the clean copy "
                                 f"{tuple(clean.shape[:2])}")
        grid, m = self._grid(clean, clean_t), lead // pt  # the clean copy's; the noisy frames are its last - m
        both = None if actions is None else torch.cat([actions, actions[:, lead:]], 1)
        x = self._embed(torch.cat([clean, latents], 1))  # (B, 2 (M + T) - M, h*w, D) patch frames
        mods = self._modulations(torch.cat([clean_t, timesteps], 1), both, final_from=grid.frames)
        cos, sin = self._rope(grid, 0, x.device)
        tail = slice(m * grid.height * grid.width, None)  # noisy frame i at its clean copy's position
        cos, sin = torch.cat([cos, cos[tail]]), torch.cat([sin, sin[tail]])
        if self.config.short_frames:  # the memory of the clean copy's frames
            mask, memory = self._long_short(grid, x.device, 0, 0, grid.frames, teacher_forcing=True)
        else:
            mask = teacher_forcing_mask(grid.frames, grid.height * grid.width, x.device, self.attention_kernel, m)
            memory = None
        x = self._run_blocks(x, mods, cos, sin, mask, memory=memory)
        return self._unpatchify(self.final_layer(x[:, grid.frames:], mods[-1]), grid._replace(frames=grid.frames - m))

    def _grid(self, latents: Tensor, timesteps: Tensor) -> PatchGrid:
        """The patch grid of latents (B, T, C, H, W), after checking them and timesteps (B, T)."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[2] != cfg.in_channels:
            raise ValueError(f"latents must be (B, T, {cfg.in_channels}, H, W), got {tuple(latents.shape)}")
        batch, frames, _, height, width = latents.shape
        pt, p = cfg.patch_size_t, cfg.patch_size
        if frames % pt or height % p or width % p:
            raise ValueError(f"latents (T, H, W) = {(frames, height, width)} must be divisible by the patch "
                             f"(patch_size_t, patch_size, patch_size) = {(pt, p, p)}")
        if timesteps.shape != (batch, frames):
            raise ValueError(f"timesteps {tuple(timesteps.shape)} must be (B, T) = {(batch, frames)}, "
                             "one per latent frame")
        return PatchGrid(frames // pt, height // p, width // p)

    def _require_causal(self, what: str) -> None:
        if self.config.attention != "causal":
            raise ValueError(f"{what} a causal model; this one has attention={self.config.attention!r}")

    def _modulations(self, timesteps: Tensor, actions: Tensor | None, final_from: int = 0) -> list[Tensor]:
        """Each block's modulation (B, T/pt, 1, 6 D), then the output layer's (B, T/pt - final_from, 1, 2 D) of the
        frames from final_from on, from the per-(temporal patch) conditioning c (B, T/pt, D) of times and actions."""
        pt = self.config.patch_size_t
        c = self.condition(timesteps, actions)  # (B, T, D)
        if pt > 1:  # (B, T/pt, D): a temporal patch shares it ("b (t pt) d -> b t pt d", mean over pt)
            c = c.unflatten(1, (-1, pt)).mean(dim=2)
        return [block.modulation(c) for block in self.blocks] + [self.final_layer.modulation(c[:, final_from:])]

    def _embed(self, latents: Tensor) -> Tensor:
        """Tokens x (B, T/pt, h*w, D) of latents (B, T, C, H, W)."""
        pt, p = self.config.patch_size_t, self.config.patch_size
        b, frames, channels, height, width = latents.shape  # "b (t pt) c (h ph) (w pw) -> b t (h w) (pt ph pw c)"
        x = latents.to(self.param_dtype).reshape(b, frames // pt, pt, channels, height // p, p, width // p, p)
        x = x.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(b, frames // pt, (height // p) * (width // p), -1)
        return self.patch_embed(x)

    def _rope(self, grid: PatchGrid, frame_offset: int, device: torch.device, stride: int = 1) -> tuple[Tensor, Tensor]:
        cfg = self.config  # the frames from absolute frame `frame_offset` on; each (T/pt*h*w, head_dim/2)
        rope = uncached_when_compiling(rope_cos_sin)
        return rope(grid.frames, grid.height, grid.width, cfg.hidden_size // cfg.num_heads, cfg.rope_theta,
                    frame_offset, torch.device(device), stride)

    def _long_short(self, grid: PatchGrid, device: torch.device, memory_frames: int, full_frames: int,
                    new_frames: int, offset: int = 0, cached: bool = False,
                    teacher_forcing: bool = False) -> tuple[FrameMask | None, Memory | None]:
        """The mask and memory of a long-short pass of `new_frames` frames after `memory_frames` cached frames'
        memory and `full_frames` cached frames' full keys (the newest), from absolute frame `offset`. A cached pass
        pools every new frame (the cache keeps them), an uncached one only the frames some query sees as memory."""
        short, pool = self.config.short_frames, self.config.memory_pool
        if grid.height % pool or grid.width % pool:
            raise ValueError(f"memory_pool {pool} must divide the token grid {grid.height}x{grid.width} (latent size "
                             f"/ patch_size {self.config.patch_size})")
        tokens, memory_tokens = grid.height * grid.width, (grid.height // pool) * (grid.width // pool)
        visible = max(0, memory_frames + new_frames - short)  # memory frames <= the last query frame - short
        ls = LongShort(short, tokens, memory_tokens, new_frames, -memory_frames, visible, -full_frames,
                       full_frames + new_frames, teacher_forcing)
        mask = long_short_mask(ls, device, self.attention_kernel)
        pooled = new_frames if cached else visible
        if pooled == 0:
            return mask, None
        cos, sin = self._rope(PatchGrid(pooled, grid.height // pool, grid.width // pool), offset, device, pool)
        return mask, Memory(pool, pooled, grid.height, grid.width, visible, cos, sin)

    def _run_blocks(self, x: Tensor, mods: list[Tensor], cos: Tensor, sin: Tensor, mask: FrameMask | None,
                    cache: KVCache | None = None, update_cache: bool = False, memory: Memory | None = None) -> Tensor:
        # gradient checkpointing recomputes a block in backward, which would read and write a cache again
        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing and cache is None
        for i, block in enumerate(self.blocks):
            args = (x, mods[i], cos, sin, mask, cache, i, update_cache, memory)
            x = self._gradient_checkpointing_func(block, *args) if checkpoint else block(*args)
        return x

    def _unpatchify(self, x: Tensor, grid: PatchGrid) -> Tensor:
        """(B, T/pt, h*w, pt*p*p*C) -> (B, T, C, H, W)."""
        pt, p = self.config.patch_size_t, self.config.patch_size  # "b t (h w) (pt ph pw c) -> b (t pt) c (h ph) (w pw)"
        x = x.reshape(x.shape[0], grid.frames, grid.height, grid.width, pt, p, p, -1)  # (B, t, h, w, pt, ph, pw, C)
        x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, t, pt, C, h, ph, w, pw)
        return x.reshape(x.shape[0], grid.frames * pt, x.shape[3], grid.height * p, grid.width * p)


def count_params(preset_or_spec: str | dict, in_channels: int = 4, patch_size: int = 2, patch_size_t: int = 1,
                 num_actions: int = 0) -> int:
    """Parameters of a VideoDiT, from its sizes alone (no instantiation, so it is instant even for xl).

    `preset_or_spec`: a preset name or a dict with hidden_size, depth, num_heads (optionally mlp_ratio, frequency_dim).
    """
    spec = DIT_MODEL_SPECS[preset_or_spec] if isinstance(preset_or_spec, str) else preset_or_spec
    d, depth, heads = spec["hidden_size"], spec["depth"], spec["num_heads"]
    mlp, freq = int(d * spec.get("mlp_ratio", 4.0)), spec.get("frequency_dim", 256)
    patch_dim = patch_size_t * patch_size * patch_size * in_channels
    embed = (patch_dim + 1) * d + (freq + 1) * d + (d + 1) * d  # patch, timestep MLP (2 layers)
    actions = (num_actions + 1) * d if num_actions > 0 else 0
    block = ((d + 1) * 3 * d + 2 * (d // heads) + (d + 1) * d  # qkv, q/k RMSNorm, out proj
             + (d + 1) * mlp + (mlp + 1) * d + (d + 1) * 6 * d)  # MLP, adaLN (6 modulations)
    final = (d + 1) * 2 * d + (d + 1) * patch_dim
    return embed + actions + depth * block + final
