"""Dockerfile and docker-compose.yml, read as text and YAML (Docker cannot run here): the GPU service,
its shared memory and volumes, compose commands that the CLI really accepts, and an image that
installs like `make setup` (torch kept, colossalai --no-deps)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
import yaml

from cli.main import app

REPO = Path(__file__).parents[1]
GPU_SERVICES = ["minisora", "download", "vae", "encode", "train", "sample"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def shm_bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).strip().lower())
    assert m, f"shm_size {size!r} is not <number>[k|m|g][b]"
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ")


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_service_reserves_gpus_shared_memory_and_volumes(compose, name):
    service = compose["services"][name]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert service.get("ipc") == "host" or shm_bytes(service["shm_size"]) >= 1024**3  # Docker's default is 64 MB
    targets = {v.split(":")[1] for v in service["volumes"]}
    assert {"/data", "/stores", "/runs"} <= targets
    assert service["build"] == "." and service["image"] == "minisora:latest"


def cli_command(tokens: list[str]):
    """The click command that `minisora <tokens>` runs, and the arguments left for it."""
    command = typer.main.get_command(app)
    while tokens and hasattr(command, "commands") and tokens[0] in command.commands:
        command, tokens = command.commands[tokens[0]], tokens[1:]
    return command, tokens


@pytest.mark.parametrize("name", ["download", "vae", "encode", "train", "sample"])
def test_stage_commands_are_real_cli_commands_and_options(compose, name):
    service = compose["services"][name]
    command, args = cli_command(service["command"])
    assert not hasattr(command, "commands"), f"{service['command']} does not name a command"
    options = {opt for p in command.params for opt in p.opts + p.secondary_opts}
    used = [a for a in args if a.startswith("--")]
    assert set(used) <= options, f"{name}: unknown options {set(used) - options}"
    ctx = command.make_context(command.name, list(args), resilient_parsing=True)  # no callbacks: paths need not exist
    positional = [p.name for p in command.params if isinstance(p, click.Argument)]
    assert all(ctx.params[p] is not None for p in positional) and not ctx.args, (ctx.params, ctx.args)


def test_multi_gpu_stages_run_under_torchrun(compose):
    for name in ["encode", "train"]:
        entrypoint = compose["services"][name]["entrypoint"]
        assert entrypoint[0] == "torchrun" and entrypoint[-2:] == ["--no-python", "minisora"]
        assert "--nproc_per_node=${NPROC:-1}" in entrypoint
    train_command = compose["services"]["train"]["command"]
    assert train_command[train_command.index("--plugin") + 1] == "zero2"
    assert "entrypoint" not in compose["services"]["minisora"]  # the image's: minisora
    assert "cache" in compose["volumes"]


def dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(ARG defaults, [(instruction, arguments)]) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    instructions = [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    return args, [(op, re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest))
                  for op, rest in instructions]


def pip_installs(instructions) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    found = []
    for op, rest in instructions:
        if op != "RUN":
            continue
        steps = [[]]
        for word in shlex.split(rest):  # quoted python -c code stays one word
            steps.append([]) if word in ("&&", "||", ";") else steps[-1].append(word)
        for words in steps:
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                found.append(words[words.index("install") + 1:])
    return found


def test_dockerfile_installs_like_make_setup_and_keeps_torch():
    args, instructions = dockerfile()
    base = [rest for op, rest in instructions if op == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)", base[0])
    installs = pip_installs(instructions)
    make_version = re.search(r"^COLOSSALAI_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    colossal = [words for words in installs if any(w.startswith("colossalai") for w in words)]
    assert colossal == [["--no-cache-dir", "--no-deps", f"colossalai=={make_version}"]]
    assert ["--no-cache-dir", "-e", ".[dev]"] in installs
    for words in installs:  # no pip call names torch: the image's CUDA build stays
        assert not any(re.match(r"torch\b", w) for w in words), words
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    assert "PIP_CONSTRAINT=/etc/minisora/keep-torch.txt" in env  # ... and no dependency may replace it
    assert any("'torch==' + m.version('torch')" in rest and "keep-torch.txt" in rest
               for op, rest in instructions if op == "RUN")
    assert ("ENTRYPOINT", '["minisora"]') in instructions


def test_dockerignore_keeps_data_out_and_the_source_in():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "stores", "runs", "outputs"} <= ignored
    needed = ["minisora", "cli", "stages", "data_manifests", "pyproject.toml", "README.md"]
    assert not ignored & set(needed) and all((REPO / n).exists() for n in needed)
