"""The stages' configs and every default they have, each written once.

The CLI options take their defaults from these fields (`defaults(TrainConfig).lr`) and
tests/test_defaults.py checks that every option does. Plain dataclasses without torch, so that
`minisora --help` shows the defaults without importing torch; each stage re-exports its config
(`from stages.train import TrainConfig`). The demo's own sizes are `stages.demo.DemoConfig`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace

# SiT's choices (minisora.interpolants, minisora.sde), listed here so that `--help` needs no torch
PATHS = ("linear", "gvp", "vp")  # x_t = a(t) x0 + s(t) e: straight, trigonometric, variance-preserving
PREDICTIONS = ("velocity", "noise", "score", "data")  # what the network outputs (data: x0)
SAMPLERS = ("euler", "heun", "sde")
SDE_DIFFUSIONS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing-decreasing")
SDE_LAST_STEPS = ("mean", "tweedie", "euler")


def defaults(cls) -> SimpleNamespace:
    """Every field of the dataclass `cls` that has a default, by name (a default_factory is called);
    fields without one (e.g. TrainConfig.store) are absent."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return SimpleNamespace(**out)


@dataclass
class FlowConfig:
    """How training times are drawn (minisora.flow); the three mode probabilities must sum to 1.

    The defaults are the plain objective: clean context at t = 0 and logit-normal times centred at
    1/2. Training's recipe changes two of them: `train_recipe()`.
    """

    p_full: float = 0.5  # all frames share one t (unconditional generation)
    p_prefix: float = 0.3  # a random prefix of k in [1, T-1] frames is clean context (t=0), the rest share one t
    p_independent: float = 0.2  # every frame draws its own t (diffusion forcing)
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    max_context: int | None = None  # cap on the prefix length k
    context_noise: float = 0.0  # context frames get t ~ U(0, context_noise) instead of 0 (still out of the loss)
    # share of steps that show a clean copy of the window as context (causal models); None: the train stage
    # picks it (1 for causal models, 0 for full attention)
    teacher_forcing: float | None = None
    path: str = "linear"  # the interpolant: linear | gvp | vp (minisora.interpolants)
    prediction: str = "velocity"  # what the network predicts: velocity | noise | score | data (x0)

    def __post_init__(self) -> None:
        probs = (self.p_full, self.p_prefix, self.p_independent)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(
                f"FlowConfig mode probabilities must be >= 0 and sum to 1, got p_full={self.p_full}, "
                f"p_prefix={self.p_prefix}, p_independent={self.p_independent} (sum {sum(probs)})"
            )
        if self.logit_std <= 0:
            raise ValueError(f"FlowConfig.logit_std must be > 0, got {self.logit_std}")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"FlowConfig.max_context must be >= 1 or None, got {self.max_context}")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"FlowConfig.context_noise must be in [0, 1), got {self.context_noise}")
        if self.teacher_forcing is not None and not 0.0 <= self.teacher_forcing <= 1.0:
            raise ValueError(f"FlowConfig.teacher_forcing must be in [0, 1], got {self.teacher_forcing}")
        _check_choice("FlowConfig.path", self.path, PATHS)
        _check_choice("FlowConfig.prediction", self.prediction, PREDICTIONS)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class SDEConfig:
    """SiT's Euler-Maruyama sampler (minisora.sde): its diffusion coefficient w(t), scaled by `norm`, and the rule
    of its last step into t = 0. The defaults are SiT's."""

    diffusion: str = "sigma"  # constant | sbdm | sigma | linear | decreasing | increasing-decreasing
    norm: float = 1.0
    last_step: str = "mean"  # mean | tweedie | euler

    def __post_init__(self) -> None:
        _check_choice("SDEConfig.diffusion (--sde-diffusion)", self.diffusion, SDE_DIFFUSIONS)
        _check_choice("SDEConfig.last_step (--sde-last-step)", self.last_step, SDE_LAST_STEPS)
        if self.norm < 0:
            raise ValueError(f"SDEConfig.norm (--sde-norm) must be >= 0, got {self.norm}")


def train_recipe() -> FlowConfig:
    """`minisora train`'s times, the recipe of the study in docs/design-notes.md (issue 16): teacher
    forcing (None: on for causal models), context noise 0.1, logit-normal times centred at 0.5 (towards noise)."""
    return FlowConfig(context_noise=0.1, logit_mean=0.5)


@dataclass
class EncodeConfig:
    manifest: str
    vae: str
    out: str
    vae_subfolder: str | None = None
    vae_revision: str | None = None
    root: str | None = None  # clip root, overriding the one recorded in the manifest
    splits: tuple[str, ...] = ("train", "test")
    batch_size: int = 64  # frames per VAE call
    device: str = "auto"
    dtype: str = "fp32"  # VAE compute dtype: fp32 | bf16 | fp16
    frame_stride: int = 1
    size: int | None = None  # resize frames to size x size before the VAE (None: native)
    on_error: str = "fail"  # fail | skip
    overwrite: bool = False
    clips_per_shard: int | None = None  # None: about `shard_mb` MB of latents per shard
    shard_mb: float = 32.0
    read_workers: int = 2
    compression_level: int = 3  # zstd level, 0 = uncompressed
    progress: bool = True


@dataclass
class VAETrainConfig:
    manifest: str  # clip manifest (minisora data manifest)
    out: str  # directory to write: config.json, diffusion_pytorch_model.safetensors, train_info.json
    steps: int = 3000
    batch_size: int = 8  # frames per step (8 beat 4 and 16 per minute on a CPU)
    latent_channels: int = 4
    downsample: int = 4  # spatial compression, 4 or 8
    width: int = 16  # channels of the first level; (16, 32, 64) per level at 4x: 0.68M parameters
    lr: float = 1e-3
    kl_weight: float = 1e-6
    loss: str = "l1"  # "l1" or "mse" reconstruction term
    device: str = "auto"
    precision: str = "auto"  # autocast of the training step: minisora.hardware.resolve_precision
    channels_last: bool = True  # NHWC activations: oneDNN's native conv layout on CPU
    threads: int | None = None  # torch CPU threads (None: torch's default, one per core)
    seed: int = 0
    max_minutes: float | None = None  # opt-in wall-clock stop: the result then depends on the machine's speed
    pool_clips: int = 16  # whole clips held in RAM
    refresh_every: int = 20  # steps between swapping one pooled clip for another
    eval_frames: int = 256  # held-out frames for PSNR, spread evenly over the test clips
    eval_every: int = 500
    overwrite: bool = False


@dataclass
class TrainConfig:
    store: str
    out: str
    model: str = "tiny"
    attention: str = "causal"  # causal (a frame sees itself and earlier frames) | full (bidirectional in the window)
    attention_kernel: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex (minisora.attention)
    patch_size: int = 2  # spatial patch on the latents (tokens per frame = h*w / patch_size^2)
    frames: int = 8  # latent frames per training window
    # long-short attention (causal): a frame sees the last short_frames frames at full resolution and older frames'
    # keys/values pooled memory_pool x memory_pool over the token grid (minisora.blocks); 0: every frame in full
    short_frames: int = 0
    memory_pool: int = 2
    # retrieved memory (minisora.retrieval): before every window, one frame of the clip's past for each of the
    # window's last retrieve_frames frames u (the frame after the moment most like frame u - 1); 0: none
    retrieve_frames: int = 0
    # "" (by latents, as above) or "F:D,...": per action id its forward step and turn (degrees); then the memory
    # frame of u is the one whose pose (integrated from the actions) is nearest u's (minisora.retrieval.pose_index)
    retrieve_motion: str = ""
    retrieve_radius: float = 0.0  # with retrieve_motion: > 0 blanks the memory of frames no pose within R actions of
    batch_size: int = 8  # windows per rank per micro-step
    lr: float = 3e-4
    warmup: int = 100
    lr_schedule: str = "cosine"  # constant | cosine (to min_lr_ratio * lr at the last step, after warm-up)
    min_lr_ratio: float = 0.1
    steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    plugin: str = "ddp"
    precision: str = "auto"  # auto (minisora.hardware) | fp32 | bf16 | fp16
    grad_accum: int = 1
    grad_checkpoint: bool = False
    compile: bool | None = None  # torch.compile the DiT's blocks; None: on for CUDA (not gemini), off on CPU
    ema_decay: float = 0.999
    ckpt_every: int = 500
    keep_last: int = 3
    sample_every: int = 0  # 0: never
    resume: str | None = "auto"  # auto | PATH | None
    branch: bool = False  # resuming before the newest checkpoint moves the newer ones to checkpoints/abandoned-*/
    use_actions: bool = False
    seed: int = 0
    log_every: int = 10
    split: str = "train"
    cache_shards: int = 8
    flow: FlowConfig = field(default_factory=train_recipe)
    wandb: bool = False
    device: str = "auto"


@dataclass
class SampleConfig:
    checkpoint: str
    out: str
    num_videos: int = 1
    frames: int | None = None  # latent frames in all (context included); None: the training window
    steps: int = 20
    shift: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # the transformer's dtype: minisora.hardware.resolve_precision
    context: str | None = None  # clip file or STORE:SPLIT:INDEX
    context_frames: int = 4  # latent frames of context
    actions: str | None = None  # "context" (the context clip's own), a .npz/.npy file, or None
    guidance: float = 1.0
    context_noise: float = 0.0  # noise level t of the known frames at sampling (0: clean context)
    formats: tuple[str, ...] = ("mp4", "gif")  # and/or "npz": unmarked frames + latents per video
    chunk: int = 1  # new latent frames per rollout window
    fps: float | None = None
    kv_cache: str = "auto"  # auto | rolling | window | off (see minisora.pipeline; full-attention models: off)
    attention_kernel: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex (minisora.attention)
    sampler: str = "euler"  # euler | heun (2 steps - 1 model calls per window) | sde (minisora.sde)
    sde: SDEConfig = field(default_factory=SDEConfig)  # the sde sampler's options
    compile: bool = False  # torch.compile a rolling rollout's passes once its KV cache is full (DiTPipeline)


# TECO's evaluation shapes by name: (context, frames in all), in latent frames (TECO's pixel frames when the VAE
# has no temporal compression, as ours): FVD on 36 -> 264 generated, PSNR/SSIM/LPIPS on 144 -> 156 (Yan et al. 2023)
EVAL_PROTOCOLS = {"teco-fvd": (36, 300), "teco-psnr": (144, 300)}


@dataclass
class EvalConfig:
    checkpoint: str
    store: str
    out: str = "report.json"
    split: str = "test"
    context_frames: int = 4  # K latent frames of context
    frames: int = 16  # N latent frames in all (context included)
    num_clips: int = 16
    seeds: int = 3
    steps: int = 20
    shift: float | None = None
    chunk: int = 1  # new latent frames per rollout window
    guidance: float = 1.0  # classifier-free guidance scale on actions (models trained with actions)
    context_noise: float = 0.0  # noise level t of the known frames at sampling (0: clean context)
    sampler: str = "euler"  # euler | heun (2 steps - 1 model calls per window) | sde (minisora.sde)
    sde: SDEConfig = field(default_factory=SDEConfig)  # the sde sampler's options
    batch_size: int = 8  # clips per pipeline call
    i3d: str | None = None
    device: str = "auto"
    kv_cache: str = "auto"  # auto | rolling | window | off (see minisora.pipeline; full-attention models: off)
    attention_kernel: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex (minisora.attention)
    precision: str = "auto"  # the transformer's dtype: minisora.hardware.resolve_precision
    compile: bool = False  # torch.compile a rolling rollout's passes once its KV cache is full (DiTPipeline)
    protocol: str | None = None  # a name of EVAL_PROTOCOLS: sets context_frames and frames
    memory_margin_db: float = 6.0  # memory split: an earlier context frame beats the last by more (memory_split.py)


@dataclass
class PlayConfig:
    checkpoint: str
    store: str | None = None  # the store the context clip comes from; None: the run's own (its pipeline records it)
    clip: str = "test:0"  # SPLIT:INDEX of the context clip in the store
    context: str | None = None  # a TECO clip file (.npz / .mp4) to start from instead of a store clip
    context_frames: int = 4  # latent frames of context
    steps: int = 5  # Euler steps per frame: the maze demo's sample_steps (stages.demo.RECIPES; 5 beat 20 there)
    shift: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # the transformer's dtype: resolve_precision, except that auto plays fp32 on a CPU
    # torch CPU threads of the generator; 1 leaves a core to the browser and the server, and a second thread bought
    # nothing on 2 busy cores (benchmarks/play.py)
    threads: int = 1
    attention_kernel: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex (minisora.attention)
    compile: bool = False  # torch.compile the passes once the rolling cache is full (minisora.live.LiveGenerator)
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    record_dir: str = "outputs/play"  # recorded sessions: RECORD_DIR/test/0000/NNNNN.npz + .mp4 (a TECO root)
