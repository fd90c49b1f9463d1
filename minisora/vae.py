"""Load a diffusers VAE (local directory or Hub id) and move between frames, pixels and latents.

    frames   uint8 (..., H, W, 3), RGB, as stored in clips
    pixels   float (..., 3, H, W) in [-1, 1], what a VAE encodes
    latents  float (B, T', C, h, w), RAW posterior samples/means: no scaling or shift applied

Image VAEs (`AutoencoderKL`, `AutoencoderTiny`) see every frame on its own (time folded into the
batch, T' = T); the video VAE `AutoencoderKLWan` sees whole clips (B, 3, T, H, W) and compresses
time causally: T = 1 + 4k frames give T' = 1 + k latent frames (the first frame alone, then groups
of four). The class is read from the model's config.json, never from code shipped with the model:
no `trust_remote_code`, weights from safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from minisora.errors import MinisoraError

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderKLWan")
VAE_KINDS = {"kl": "AutoencoderKL", "tiny": "AutoencoderTiny", "wan": "AutoencoderKLWan"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class VAEError(MinisoraError, ValueError):
    """A VAE that cannot be loaded or an input it cannot encode; the message says which and why."""


# ---------------------------------------------------------------------------- frames <-> pixels
def frames_to_pixels(frames: np.ndarray | Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # read-only buffers (np.frombuffer, memmaps) cannot be shared with torch
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (..., H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.movedim(-1, -3).float() / 127.5 - 1.0


def pixels_to_frames(pixels: Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) (clamped, rounded)."""
    if pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"pixels must be (..., 3, H, W), got {tuple(pixels.shape)}")
    frames = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.movedim(-3, -1).cpu().numpy()


# ---------------------------------------------------------------------------- what the store records
@dataclass
class VAEInfo:
    """Everything a latent store records about the VAE that made it (json-serialisable via asdict)."""

    source: str  # local directory (absolute) or Hub id
    subfolder: str | None
    revision: str | None
    class_name: str
    scaling_factor: float  # from the model's config; minisora stores raw latents and its own stats
    shift_factor: float
    spatial_compression: int  # H / h
    temporal_compression: int  # 1 for image VAEs, 4 for Wan
    latent_channels: int
    deterministic: bool  # True: no posterior variance (AutoencoderTiny), logvar is None
    weights_sha256: str | None = None  # weights_sha256(model): the VAE's identity (None: not computed yet)
    config_sha256: str | None = None  # of the model's config without diffusers' "_..." bookkeeping keys


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the VAE's state dict (names, shapes, values as float32), sorted by name.

    The same weights give the same digest whatever dtype or device they were loaded in (fp16/bf16
    values are exact in float32), and wherever the model came from: a Hub id, a local copy, or the
    VAE saved inside a pipeline. A store's latents can be decoded only by the VAE with its digest.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def config_sha256(config) -> str:
    """sha256 of a diffusers config as canonical JSON, without the "_name_or_path"-style bookkeeping."""
    doc = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()


def _compression(class_name: str, config) -> tuple[int, int, int]:
    """(spatial, temporal, latent channels), derived from the architecture in the config."""
    if class_name == "AutoencoderKL":
        return 2 ** (len(config["block_out_channels"]) - 1), 1, config["latent_channels"]
    if class_name == "AutoencoderTiny":
        return 2 ** (len(config["encoder_block_out_channels"]) - 1), 1, config["latent_channels"]
    # AutoencoderKLWan: one stride-2 stage per dim_mult step, temporal in those marked True;
    # Wan 2.2 also folds `patch_size` x `patch_size` pixels into channels before the encoder.
    spatial = 2 ** (len(config["dim_mult"]) - 1) * (config.get("patch_size") or 1)
    return spatial, 2 ** sum(bool(t) for t in config["temperal_downsample"]), config["z_dim"]


def _make_info(model, source: str, subfolder: str | None, revision: str | None, digest: bool = False) -> VAEInfo:
    class_name = type(model).__name__
    if class_name not in SUPPORTED_CLASSES:
        raise VAEError(f"{source}: VAE class {class_name} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})")
    config = dict(model.config)
    spatial, temporal, channels = _compression(class_name, config)
    return VAEInfo(
        source=source,
        subfolder=subfolder,
        revision=revision,
        class_name=class_name,
        scaling_factor=float(config.get("scaling_factor") or 1.0),
        shift_factor=float(config.get("shift_factor") or 0.0),
        spatial_compression=spatial,
        temporal_compression=temporal,
        latent_channels=int(channels),
        deterministic=class_name == "AutoencoderTiny",
        weights_sha256=weights_sha256(model) if digest else None,
        config_sha256=config_sha256(config),
    )


# ---------------------------------------------------------------------------- locating a model
def _describe(source: str, subfolder: str | None, revision: str | None) -> str:
    extra = [f"subfolder={subfolder!r}"] * bool(subfolder) + [f"revision={revision!r}"] * bool(revision)
    return source + (f" ({', '.join(extra)})" if extra else "")


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
    for mod, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(source: str, subfolder: str | None, revision: str | None, e: BaseException) -> VAEError:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    what = _describe(source, subfolder, revision)
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return VAEError(
            f"{what}: cannot reach the Hugging Face Hub (offline, HF_HUB_OFFLINE set, or no network) and the "
            f"model is not in the local Hub cache; there is no local directory {source!r} either. Pass a local "
            f"diffusers model directory instead: one written by `minisora vae train --out DIR`, or a copy made "
            f"on a machine with Hub access (`hf download {source} --local-dir DIR`, then --vae DIR, with the subfolder "
            "if any)."
        )
    return VAEError(f"{what}: cannot fetch from the Hugging Face Hub: {type(e).__name__}: {e}".rstrip())


def looks_local(source: str) -> bool:
    """A VAE source meant as a local path, never a Hub id: it starts with '.', '/' or '~', holds an OS
    separator other than the one '/' of `org/name`, has more than one '/', or its parent directory exists."""
    seps = {os.sep, os.altsep} - {None, "/"}
    if source.startswith((".", "/", "~")) or any(sep in source for sep in seps) or source.count("/") > 1:
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def read_vae_config(source: str, subfolder: str | None = None, revision: str | None = None) -> tuple[dict, str]:
    """The model's config.json as a dict, and the source to record (local dirs made absolute)."""
    local = Path(source).expanduser()
    if local.is_dir():
        model_dir = local / subfolder if subfolder else local
        path = model_dir / "config.json"
        if not path.is_file():
            hint = (" (it has a vae/ subfolder: pass subfolder 'vae', --vae-subfolder vae)"
                    if (local / "vae" / "config.json").is_file() else "")
            raise VAEError(f"{path}: no config.json; expected a diffusers model directory "
                           f"(save_pretrained output){hint}")
        try:
            return json.loads(path.read_text()), str(local.resolve())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VAEError(f"{path}: cannot read it as JSON ({e})") from e
    if local.exists():
        raise VAEError(f"{source}: is a file; expected a diffusers model directory or a Hub id like "
                       "stabilityai/sd-vae-ft-ema")
    if looks_local(source):
        raise VAEError(f"{source}: no such directory, and not a Hub id (it is a local path, so the Hub is not asked); "
                       "pass an existing diffusers model directory, e.g. one written by `minisora vae train --out DIR`")
    if not _HUB_ID.fullmatch(source):
        raise VAEError(f"{source}: no such directory, and not a Hub id (expected owner/name, e.g. "
                       "stabilityai/sd-vae-ft-ema)")
    from huggingface_hub import hf_hub_download

    from minisora.paths import hub_reachable
    try:
        path = hf_hub_download(source, "config.json", subfolder=subfolder, revision=revision,
                               local_files_only=not hub_reachable())  # a missing name fails at once
    except _hub_errors() as e:
        raise _hub_error(source, subfolder, revision, e) from e
    return json.loads(Path(path).read_text()), source


# ---------------------------------------------------------------------------- the wrapper
class VideoVAE:
    """A diffusers VAE behind one interface: (B, T, 3, H, W) pixels <-> (B, T', C, h, w) raw latents."""

    frames_per_call = 64  # image VAEs: frames per forward pass, bounds activation memory

    def __init__(self, model: torch.nn.Module, info: VAEInfo):
        self.model = model.eval().requires_grad_(False)
        self.info = info

    @classmethod
    def load(cls, source: str, subfolder: str | None = None, revision: str | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "VideoVAE":
        """From a local diffusers model directory or a Hub id (+ subfolder, revision); safetensors only."""
        import diffusers

        config, recorded = read_vae_config(source, subfolder, revision)
        class_name = config.get("_class_name")
        if class_name not in SUPPORTED_CLASSES:
            raise VAEError(f"{_describe(source, subfolder, revision)}: config.json names _class_name={class_name!r}; "
                           f"supported: {', '.join(SUPPORTED_CLASSES)}")
        model_cls = getattr(diffusers, class_name)
        try:  # float32 first: the digest of the weights must not depend on the compute dtype
            model = model_cls.from_pretrained(recorded, subfolder=subfolder, revision=revision,
                                              torch_dtype=torch.float32, use_safetensors=True)
        except _hub_errors() as e:
            if Path(recorded).is_dir():
                raise VAEError(f"{_describe(recorded, subfolder, revision)}: cannot load {class_name} from it "
                               f"(weights must be safetensors): {e}") from e
            raise _hub_error(source, subfolder, revision, e) from e
        info = _make_info(model, recorded, subfolder, revision, digest=True)
        model = model.to(device) if dtype == torch.float32 else model.to(device, dtype)  # diffusers warns on any dtype
        return cls(model, info)

    @classmethod
    def from_model(cls, model: torch.nn.Module, source: str = "<in-memory>") -> "VideoVAE":
        """Wrap a diffusers VAE already in memory (tests, a VAE trained in this process)."""
        return cls(model, _make_info(model, source, None, None))

    def identity(self) -> str:
        """weights_sha256 of this VAE (computed once, then kept in `info`)."""
        if self.info.weights_sha256 is None:
            self.info.weights_sha256 = weights_sha256(self.model)
        return self.info.weights_sha256

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def latent_frames(self, frames: int) -> int:
        """Latent frames that `frames` frames give (1 + (T - 1) // 4 for Wan, T for image VAEs)."""
        return 0 if frames < 1 else 1 + (frames - 1) // self.info.temporal_compression

    def latent_actions(self, actions: np.ndarray, n: int) -> np.ndarray:
        """Per-frame actions (T,) -> one per latent frame (n,): latent frame j covers the pixel frames ending at
        j * temporal_compression, so it gets that frame's action (the last one past the clip's end)."""
        if self.info.temporal_compression == 1:
            return actions[:n]
        return actions[np.minimum(np.arange(n) * self.info.temporal_compression, len(actions) - 1)]

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames that `latent_frames` latent frames decode to (1 + 4 (n - 1) for Wan, n for image VAEs)."""
        return 0 if latent_frames < 1 else 1 + (latent_frames - 1) * self.info.temporal_compression

    def usable_frames(self, frames: int) -> int:
        """The largest frame count <= `frames` that encodes without remainder (1 + 4k for Wan)."""
        return self.pixel_frames(self.latent_frames(frames))

    def _check(self, x: Tensor, what: str, channels: int) -> None:
        if x.ndim != 5 or x.shape[2] != channels:
            raise VAEError(f"{self.info.class_name}: {what} must be (B, T, {channels}, H, W), got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        """pixels (B, T, 3, H, W) in [-1, 1] -> posterior mean, logvar (B, T', C, h, w) float32, raw.

        logvar is None for deterministic encoders. Outputs are on the device `pixels` came from.
        """
        self._check(pixels, "pixels", 3)
        b, t, _, h, w = pixels.shape
        sc, name = self.info.spatial_compression, self.info.class_name
        if h % sc or w % sc:
            raise VAEError(f"{name}: frame size {h}x{w} is not divisible by its spatial compression {sc}")
        if t < 1 or t != self.usable_frames(t):
            raise VAEError(f"{name}: encodes 1 + {self.info.temporal_compression}k frames, got {t}; "
                           f"use the first usable_frames({t}) = {self.usable_frames(t)}")
        x = pixels.to(self.device, self.dtype)
        if self.info.temporal_compression > 1:  # video VAE: whole clips, causal in time
            dist = self.model.encode(rearrange(x, "b t c h w -> b c t h w")).latent_dist
            mean = rearrange(dist.mean, "b c t h w -> b t c h w")  # (B, T', C, h, w)
            logvar = rearrange(dist.logvar, "b c t h w -> b t c h w")
        else:  # image VAE: every frame on its own
            x = rearrange(x, "b t c h w -> (b t) c h w")
            means, logvars = [], []
            for chunk in x.split(self.frames_per_call):
                if self.info.deterministic:
                    means.append(self.model.encode(chunk).latents)
                else:
                    dist = self.model.encode(chunk).latent_dist
                    means.append(dist.mean)
                    logvars.append(dist.logvar)
            mean = rearrange(torch.cat(means), "(b t) c h w -> b t c h w", b=b)  # (B, T, C, h, w)
            logvar = rearrange(torch.cat(logvars), "(b t) c h w -> b t c h w", b=b) if logvars else None
        out = pixels.device
        return mean.float().to(out), (logvar.float().to(out) if logvar is not None else None)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """raw latents (B, T', C, h, w) -> pixels (B, T, 3, H, W) in [-1, 1], float32, on the latents' device."""
        self._check(latents, "latents", self.info.latent_channels)
        b = latents.shape[0]
        z = latents.to(self.device, self.dtype)
        if self.info.temporal_compression > 1:
            x = self.model.decode(rearrange(z, "b t c h w -> b c t h w")).sample
            pixels = rearrange(x, "b c t h w -> b t c h w")  # (B, 1 + 4(T' - 1), 3, H, W)
        else:
            z = rearrange(z, "b t c h w -> (b t) c h w")
            x = torch.cat([self.model.decode(chunk).sample for chunk in z.split(self.frames_per_call)])
            pixels = rearrange(x, "(b t) c h w -> b t c h w", b=b)
        return pixels.float().clamp(-1, 1).to(latents.device)


# ---------------------------------------------------------------------------- small models from configs
def tiny_vae_config(kind: str = "kl", latent_channels: int = 4, downsample: int = 4, width: int = 8,
                    first_width: int | None = None) -> dict:
    """Constructor kwargs of a small VAE of `kind` (see VAE_KINDS) with `downsample`x spatial compression.

    width=8 gives test-sized models; `minisora vae train` uses width=16 (0.68M parameters for kl, 4x).
    Wan always compresses time 4x (its two lowest-resolution stages are temporal), so needs downsample >= 4.
    `first_width` (kl only) narrows the full-resolution level alone, where most of a CPU step's
    convolution time goes: (8, 32, 64) instead of (16, 32, 64).
    """
    if kind not in VAE_KINDS:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {', '.join(VAE_KINDS)}")
    levels = int(math.log2(downsample)) + 1 if downsample >= 2 else 0
    if downsample < 2 or 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
    if width < 8 or width % 8:
        raise ValueError(f"width must be a positive multiple of 8 (GroupNorm with 8 groups), got {width}")
    if kind == "kl":
        # Channels double per level up to 4x width: (16, 32, 64) for width 16 and 4x downsampling. A level
        # at half the resolution with twice the channels costs the same compute, so the narrow
        # full-resolution levels keep a CPU step cheap: (16, 32, 64) needs 2.1 GFLOP per 64x64 frame
        # (forward + backward) against 5.0 for (32, 64, 64), and reaches a better PSNR per minute.
        channels = [width * 2 ** min(i, 2) for i in range(levels)]
        if first_width is not None:
            if first_width < 8 or first_width % 8:
                raise ValueError(f"first_width must be a positive multiple of 8, got {first_width}")
            channels[0] = first_width
        return dict(
            in_channels=3, out_channels=3, latent_channels=latent_channels,
            down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
            block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=64,
            scaling_factor=1.0,
        )
    if kind == "tiny":
        return dict(
            in_channels=3, out_channels=3, latent_channels=latent_channels,
            encoder_block_out_channels=[width] * levels, decoder_block_out_channels=[width] * levels,
            num_encoder_blocks=[1] * levels, num_decoder_blocks=[1] * levels, upsampling_scaling_factor=2,
        )
    if downsample < 4:
        raise ValueError(f"a Wan VAE compresses time 4x in its two lowest stages, so needs downsample >= 4, "
                         f"got {downsample}")
    return dict(
        base_dim=width, z_dim=latent_channels, dim_mult=[1] + [2] * (levels - 1), num_res_blocks=1,
        temperal_downsample=[False] * (levels - 3) + [True, True],
        latents_mean=[0.0] * latent_channels, latents_std=[1.0] * latent_channels,
        scale_factor_spatial=downsample, scale_factor_temporal=4,
    )


def build_vae(class_name: str, config: dict) -> VideoVAE:
    """A randomly initialised VAE of `class_name` from constructor kwargs (e.g. tiny_vae_config)."""
    import diffusers

    class_name = VAE_KINDS.get(class_name, class_name)
    if class_name not in SUPPORTED_CLASSES:
        raise VAEError(f"VAE class {class_name!r} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})")
    return VideoVAE.from_model(getattr(diffusers, class_name)(**config))
