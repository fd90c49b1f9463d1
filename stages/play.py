"""`minisora play`: drive a trained causal world model live from the keyboard, in a browser.

Loads the run's pipeline (DiTPipeline.from_run), refuses a model that cannot roll out one frame at a
time (minisora.live.check_playable), takes the context from a store clip (`--clip SPLIT:INDEX` of
`--store`, default: the store the run was trained on) or a TECO clip file (`--context`), names the
dataset's actions and binds them to keys (minisora.play_actions), and serves the page and a WebSocket
per player with Starlette + uvicorn (minisora.play_app) until Ctrl-C.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from starlette.applications import Starlette

from minisora.configs import PlayConfig  # noqa: F401 (re-exported: stages.play.PlayConfig)
from minisora.context import load_context
from minisora.dist import resolve_device
from minisora.errors import MinisoraError
from minisora.live import LiveGenerator, PlayError, check_playable
from minisora.pipeline import DiTPipeline
from minisora.play_actions import ActionSet, action_set
from minisora.play_app import PlayServer, build_app
from minisora.run_dir import precision_dtype, read_description


@dataclass
class Playable:
    """What `main` serves: the app, and what the terminal says about it."""
    app: Starlette
    actions: ActionSet
    context: str  # where the context came from
    lines: list[str]  # what to print before the address


def context_source(cfg: PlayConfig, description: dict) -> str:
    """The context to start from: the --context clip file, or STORE:SPLIT:INDEX for --clip."""
    if cfg.context:
        return cfg.context
    store = cfg.store or description.get("store")
    if not store:
        raise PlayError(f"{cfg.checkpoint}: the run does not record the store it was trained on; give --store STORE "
                        "(with --clip SPLIT:INDEX) or --context CLIP_FILE")
    split, _, index = cfg.clip.partition(":")
    if not split or not index.isdigit():
        raise PlayError(f"--clip {cfg.clip}: expected SPLIT:INDEX, e.g. test:3")
    return f"{store}:{split}:{index}"


def key_lines(actions: ActionSet) -> list[str]:
    """The key map for the terminal, one line: keys = name (id), and what no key sends."""
    shown = [f"{'/'.join(k.removeprefix('Key').removeprefix('Digit') for k, a in actions.keys.items() if a == i)} = "
             f"{name} ({i})" for i, name in enumerate(actions.names) if i in actions.keys.values()]
    idle = "the null action" if actions.idle < 0 else actions.names[actions.idle]
    return [f"keys: {', '.join(shown)}; no key = {idle} ({actions.idle}); actions from {actions.source}"]


def prepare(cfg: PlayConfig) -> Playable:
    """Load and check everything `main` serves (the app and its lines), without serving it."""
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    # auto plays fp32 on a CPU: one-frame passes of a few tokens are bound by per-op overhead, which bf16's casts
    # add to (benchmarks/play.py, idle AMD EPYC Zen 4 with AVX512-BF16: 20.7 frames/s in fp32, 18.0 in bf16)
    precision = "fp32" if cfg.precision == "auto" and device.type == "cpu" else cfg.precision
    pipe = DiTPipeline.from_run(cfg.checkpoint, device, precision_dtype(precision, device))
    pipe.transformer.set_attention_kernel(cfg.attention_kernel)
    check_playable(pipe, cfg.checkpoint)  # before the context is loaded and encoded
    if cfg.steps < 1:
        raise PlayError(f"--steps {cfg.steps}: at least one Euler step per frame")
    description = read_description(cfg.checkpoint)
    source = context_source(cfg, description)
    ctx = load_context(pipe, source, cfg.context_frames)
    actions = action_set(description.get("source"), pipe.transformer.config.num_actions)
    make_live = partial(LiveGenerator, pipe, ctx.latents, ctx.actions, cfg.steps, cfg.shift, cfg.seed, cfg.compile)
    fps = pipe.config.fps or 10  # recorded mp4s play at the dataset's rate (the DMLab card records none)
    app = build_app(make_live, actions, cfg.record_dir, fps, title=f"{cfg.checkpoint} from {ctx.name}")
    rollout = pipe.rollout_line("rolling", cfg.compile)
    lines = [f"model: {rollout}, one frame per step, {cfg.steps} Euler steps, on {device}",
             f"context: {source} ({cfg.context_frames} latent frames)", *key_lines(actions),
             f"recordings: {cfg.record_dir}/test/0000/NNNNN.npz (video, actions) + .mp4"]
    return Playable(app, actions, source, lines)


def main(cfg: PlayConfig) -> None:
    try:
        playable = prepare(cfg)
    except ValueError as e:  # a bad option value met inside the pipeline or the context
        if isinstance(e, MinisoraError):
            raise
        raise PlayError(str(e)) from e
    server = PlayServer(playable.app, cfg.host, cfg.port)
    for line in playable.lines:
        print(line, flush=True)
    print(f"minisora play: open {server.url} in a browser (Ctrl-C to stop)", flush=True)
    server.run()
