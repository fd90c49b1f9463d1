"""`minisora train`: stage two, a flow-matching video DiT on a latent store with ColossalAI."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import typer

from minisora.configs import TrainConfig, defaults
from minisora.contracts import contracts_help

T = defaults(TrainConfig)  # every option's default is its TrainConfig field's (T.flow: the flow recipe's)
FLOW_OPTIONS = ("p_full", "p_prefix", "p_independent", "context_noise", "teacher_forcing", "logit_mean", "path",
                "prediction")

# kept literal so that `minisora --help` does not import diffusers; the parameter count of the chosen
# preset is printed when training starts (minisora.model.count_params / DIT_MODEL_SPECS)
_PRESETS = ("tiny (2.8M params), small (32.5M), base (129.5M), large (456.8M), xl (673.7M), "
            "at 4 latent channels, patch 2")


def train(
    store: str = typer.Option(..., help="Latent store written by `minisora encode` (path or fsspec URL); must be "
                              "complete."),
    out: str = typer.Option(..., help="Run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json."),
    model: str = typer.Option(T.model, help=f"Model size preset: {_PRESETS}."),
    attention: str = typer.Option(T.attention, help="causal: a frame attends to itself and earlier frames only, so "
                                  "training can teacher-force and sampling reuses a KV cache (one frame of tokens per "
                                  "Euler step instead of a window); full: bidirectional attention inside the window."),
    attention_kernel: str = typer.Option(T.attention_kernel, help="Attention kernel: auto (FlexAttention on CUDA, "
                                         "which skips masked blocks; SDPA elsewhere), sdpa "
                                         "(scaled_dot_product_attention with a bool mask) or flex (compiles its "
                                         "forward on CPU too, but has no CPU backward). Not saved with the weights: "
                                         "sampling picks its own."),
    patch_size: int = typer.Option(T.patch_size, min=1, help="Spatial patch size on the latents: tokens per frame = "
                                   "h*w / patch^2 (4 makes a 16x16 latent 16 tokens: 4x cheaper, coarser)."),
    frames: int = typer.Option(T.frames, min=1, help="Latent frames per training window (clips shorter than this are "
                               "not used)."),
    short_frames: int = typer.Option(T.short_frames, min=0, help="Long-short attention (--attention causal): a frame "
                                     "attends to the last N frames (itself included) at full resolution and to older "
                                     "frames of the window through a compressed memory, their keys and values pooled "
                                     "--memory-pool x --memory-pool over the token grid, so long --frames cost nearly "
                                     "linearly; the KV cache of a rollout keeps N-1 frames in full. 0: every frame in "
                                     "full (quadratic in --frames). Saved with the weights."),
    memory_pool: int = typer.Option(T.memory_pool, min=1, help="With --short-frames: average keys and values of "
                                    "older frames over P x P patches of the token grid (P must divide it: latent size "
                                    "/ --patch-size), so each costs 1/P^2 of a full frame. Saved with the weights."),
    retrieve_frames: int = typer.Option(T.retrieve_frames, min=0, help="Retrieved memory (--attention causal, "
                                        "--short-frames 0): before each window of --frames frames, N clean frames "
                                        "of the clip's own past, one for each of the window's last N frames u: the "
                                        "frame after the earlier moment (at least --frames frames back) most like "
                                        "frame u - 1; left out of the loss. Rollouts retrieve from context and "
                                        "generated frames by the same rule (chunk 1). Costs N more frames per "
                                        "window. 0: none. Saved with the run."),
    retrieve_motion: str = typer.Option(T.retrieve_motion, help="With --retrieve-frames and --use-actions: pick "
                                        "memory frames by where the camera is, not by latents (which drift in a "
                                        "rollout). Per action id, in order, its forward step and turn in degrees "
                                        "(left positive): 'F:D,F:D,...' (revisit family: 0.09:0,0:10,0:-10,0:0; "
                                        "walk: 0.09:0,0:6,0:-6,0:0). The pose is the sum of the actions' moves; the "
                                        "memory frame of u is the oldest of the frames (at least --frames back) "
                                        "nearest its pose. Saved with the run."),
    retrieve_radius: float = typer.Option(T.retrieve_radius, help="With --retrieve-motion: a frame whose nearest "
                                          "pose is more than this many actions away gets a blank memory frame "
                                          "(zero latents, the null action) instead of a view from elsewhere. 0: "
                                          "always the nearest. 2 met issue 24's memory targets on the revisit and "
                                          "walk families (docs/design-notes.md). Saved with the run."),
    batch_size: int = typer.Option(T.batch_size, min=1, help="Windows per process per micro-step (global batch = "
                                   "processes x this x grad-accum)."),
    lr: float = typer.Option(T.lr, help="Peak AdamW learning rate."),
    warmup: int = typer.Option(T.warmup, min=0, help="Linear warm-up steps."),
    lr_schedule: str = typer.Option(T.lr_schedule, help="After warm-up: cosine (decay to --min-lr-ratio x lr at the "
                                    "last step) or constant."),
    min_lr_ratio: float = typer.Option(T.min_lr_ratio, min=0.0, max=1.0, help="Final learning rate of the cosine "
                                       "schedule, as a fraction of --lr."),
    steps: int = typer.Option(T.steps, min=1, help="Total optimizer steps."),
    weight_decay: float = typer.Option(T.weight_decay, help="AdamW weight decay."),
    grad_clip: float = typer.Option(T.grad_clip, help="Clip the global gradient norm to this (0: off), through the "
                                    "plugin's own path (see --plugin)."),
    plugin: str = typer.Option(T.plugin, help="ColossalAI plugin and its contract (none of it has run on a GPU yet). "
                               + contracts_help()),
    precision: str = typer.Option(T.precision, help="auto (bf16 where the device computes it natively: CUDA with bf16, "
                                  "a CPU with AMX or AVX512-BF16; else fp32; TF32 on CUDA), fp32, bf16, or fp16 "
                                  "(CUDA only). The choice is printed once at the start."),
    grad_accum: int = typer.Option(T.grad_accum, min=1, help="Micro-steps accumulated per optimizer step."),
    grad_checkpoint: bool = typer.Option(T.grad_checkpoint, "--grad-checkpoint", help="Recompute activations in the "
                                         "backward pass (less memory, ~30% slower)."),
    compile: Optional[bool] = typer.Option(T.compile, "--compile/--no-compile",
                                           show_default="on for CUDA (not gemini), off on CPU",
                                 help="torch.compile the DiT's transformer blocks (in place, so checkpoints keep "
                                      "their parameter names; the blocks share one graph)."),
    ema_decay: float = typer.Option(T.ema_decay, min=0.0, max=1.0, help="EMA decay of the weights that sampling uses."),
    ckpt_every: int = typer.Option(T.ckpt_every, min=0, help="Save a checkpoint every N steps and at the last step (0: "
                                   "never)."),
    keep_last: int = typer.Option(T.keep_last, min=0, help="Keep only the newest N checkpoints (0: keep all)."),
    sample_every: int = typer.Option(T.sample_every, min=0, help="Every N steps, rank 0 continues a few test clips, "
                                     "decodes them with the store's VAE and saves a gif + PSNR (0: off)."),
    resume: str = typer.Option(T.resume, help="auto: continue from the newest checkpoint in OUT if any; a checkpoint "
                               "path; or 'none' to start fresh. A path older than OUT's newest checkpoint (or 'none' "
                               "over existing ones) is refused unless --branch."),
    branch: bool = typer.Option(T.branch, "--branch", help="Accept that --resume starts a branch: OUT's newer "
                                "checkpoints (and their metrics lines) move to OUT/checkpoints/abandoned-<time>/, "
                                "never resumed or sampled; metrics.jsonl records where the branch started."),
    use_actions: bool = typer.Option(T.use_actions, "--use-actions", help="Condition on per-frame actions (with "
                                     "dropout, for classifier-free guidance)."),
    seed: int = typer.Option(T.seed, help="Seed of weights, data order, noise (a resumed run repeats the same "
                             "randomness)."),
    log_every: int = typer.Option(T.log_every, min=1, help="Log loss / throughput every N steps (one host sync per "
                                  "interval)."),
    p_full: float = typer.Option(T.flow.p_full, help="Steps without teacher forcing: probability of a window with one "
                                 "noise level for all frames (generation)."),
    p_prefix: float = typer.Option(T.flow.p_prefix, help="Probability of a clean random prefix as context "
                                   "(continuation)."),
    p_independent: float = typer.Option(T.flow.p_independent, help="Probability of an independent noise level per "
                                        "frame (diffusion forcing)."),
    context_noise: float = typer.Option(T.flow.context_noise, min=0.0, max=0.99, help="Context frames (and teacher "
                                        "forcing's clean copy) get their own noise level t ~ U(0, this) instead of 0, "
                                        "still out of the loss, so the model learns to continue from imperfect frames "
                                        "as in a rollout (0: clean context)."),
    teacher_forcing: Optional[float] = typer.Option(T.flow.teacher_forcing, min=0.0, max=1.0, help="Share of steps "
                                                    "trained with teacher forcing (--attention causal): each noisy "
                                                    "frame, at its own t, attends to a clean copy of the frames before "
                                                    "it, as in a chunk-1 rollout; the other steps use the --p-* mix. "
                                                    "Default: 1 for causal models, 0 for full."),
    logit_mean: float = typer.Option(T.flow.logit_mean, help="Training times t = sigmoid(N(logit_mean, 1)): > 0 puts "
                                     "more of the loss at high noise, where a frame's layout is decided, < 0 at low "
                                     "noise."),
    path: str = typer.Option(T.flow.path, help="The interpolant x_t = a(t) x0 + s(t) e from data (t=0) to noise (t=1) "
                             "(SiT): linear (a = 1 - t, s = t: rectified flow), gvp (a = cos(pi t/2), s = sin(pi t/2)) "
                             "or vp (DDPM's linear-beta VP, beta 0.1..20). Saved with the run: sampling follows it."),
    prediction: str = typer.Option(T.flow.prediction, help="What the network predicts (SiT): velocity (loss "
                                   "|v - v*|^2), noise (|e - e*|^2), score (|s(t) q + e|^2: score matching weighted "
                                   "by s^2) or data (x0: |x0 - x0*|^2, on linear the velocity loss weighted by t^2). "
                                   "Saved with the run: sampling converts it to a velocity."),
    cache_shards: int = typer.Option(T.cache_shards, min=1, help="Open store shards each rank mixes its batches from "
                                     "and keeps in RAM (3 more are read ahead); part of the data order, so a resumed "
                                     "run needs the same value."),
    wandb: bool = typer.Option(T.wandb, "--wandb", help="Also log to Weights & Biases (if installed)."),
    device: str = typer.Option(T.device, help="auto (CUDA if available), cpu (also on a CUDA machine: gloo, no GPU "
                               "touched) or cuda."),
):
    """Train a video DiT with rectified flow on cached latents (no pixels, no VAE in the loop).

    One process: `minisora train ...`. Several: `torchrun --nproc_per_node=N --no-python minisora train ...`
    (multi-node: add --nnodes, --node_rank and --rdzv_endpoint). Killed runs resume from the newest
    checkpoint with the same command.
    """
    options = dict(locals())  # the options by name: TrainConfig fields, and FLOW_OPTIONS of its flow
    from minisora import paths
    from minisora.errors import MinisoraError, debug_enabled, user_message

    paths.check_store(store)  # before any work: every path means what it says, OUT can be written
    paths.check_output_dir(out)
    if resume not in ("auto", "none"):
        paths.check_location(resume, "--resume", accepts="a local checkpoint directory, auto or none")
    from stages.train import main

    try:
        flow = replace(T.flow, **{name: options.pop(name) for name in FLOW_OPTIONS})
        cfg = TrainConfig(**options | {"resume": None if resume == "none" else resume}, flow=flow)
        result = main(cfg)
    except MinisoraError:
        raise  # cli/main.py reports it (one line, or the traceback with --debug)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # a bad option value, found by the stage
        if debug_enabled():
            raise
        typer.secho(f"error: {user_message(e)}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"trained to step {result['step']}: loss {result['loss']:.4f}; {len(result['checkpoints'])} "
               f"checkpoint(s) in {out}/checkpoints")
