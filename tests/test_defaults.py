"""Each default written once: every CLI option's default is its config field's (STYLE.md, principle 12).

Walks every `minisora` command's click parameters. An option maps to the config field of its name
(train's flow options to TrainConfig.flow's fields); the few that differ are listed below with why,
and so are the config fields no option sets, so that a new option or field has to be placed here.
"""

import subprocess
import sys
from dataclasses import MISSING, fields

import typer

from cli.main import app
from minisora.configs import EncodeConfig, TrainConfig, VAETrainConfig, defaults
from stages.demo import DemoConfig
from stages.evaluate import EvalConfig
from stages.play import PlayConfig
from stages.sample import SampleConfig

CONFIGS = {"train": TrainConfig, "encode": EncodeConfig, "vae train": VAETrainConfig, "demo": DemoConfig,
           "sample": SampleConfig, "eval": EvalConfig, "play": PlayConfig}
WITHOUT_CONFIG = {"data synth", "data manifest", "data download", "store info", "store verify", "vae info"}
# (the options of those go straight to a function, not into a config)

# (command, option) -> the field it fills and how the option spells that field's default
SPELLED = {("encode", "splits"): ("splits", ",".join), ("sample", "format"): ("formats", ",".join)}
# options that fill no field of their own, or whose default stands for something the field cannot say
NOT_FIELDS = {
    ("sample", "no_kv_cache"): "--no-kv-cache sets kv_cache='off'",
    ("eval", "no_kv_cache"): "--no-kv-cache sets kv_cache='off'",
}
# config fields that no option sets
CONFIG_ONLY = {
    "train": {"split", "flow.logit_std", "flow.max_context"},
    "encode": {"shard_mb", "progress"},
    "vae train": set(),
    "demo": {"frame_stride", "workers"},
    "sample": set(),
    "eval": set(),
    "play": set(),
}


def _commands(group, prefix: str = ""):
    """(path, command) of every command under the click group `group`, e.g. ('vae train', ...)."""
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(cmd, "commands"):  # a group (typer's own click: no isinstance against click.Group)
            yield from _commands(cmd, path + " ")
        else:
            yield path, cmd


def _field_defaults(cls) -> dict:
    """field name -> default (MISSING where required); a dataclass default (TrainConfig.flow) by its fields,
    `flow.p_full` ..."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
            out |= {f"{f.name}.{k}": v for k, v in vars(value).items()} if hasattr(value, "__dataclass_fields__") \
                else {f.name: value}
        else:
            out[f.name] = MISSING
    return out


def _field_of(option: str, known: dict) -> str | None:
    """The field an option fills: the one of its name, train's flow field of its name, or sample's and eval's
    SDEConfig field (--sde-norm: sde.norm)."""
    return next((name for name in (option, f"flow.{option}", option.replace("sde_", "sde.", 1)) if name in known),
                None)


def test_every_command_is_placed():
    commands = dict(_commands(typer.main.get_command(app)))
    assert set(commands) == set(CONFIGS) | WITHOUT_CONFIG, (
        "place each command in CONFIGS or WITHOUT_CONFIG: " + str(set(commands) ^ (set(CONFIGS) | WITHOUT_CONFIG)))


def test_every_option_default_is_its_config_fields():
    wrong, unmapped, used = [], [], {c: set() for c in CONFIGS}
    for command, cmd in _commands(typer.main.get_command(app)):
        if command not in CONFIGS:
            continue
        known = _field_defaults(CONFIGS[command])
        for param in cmd.params:
            if (command, param.name) in NOT_FIELDS:
                used[command].add(param.name)
                continue
            field_name, spell = SPELLED.get((command, param.name), (None, None))
            field_name = field_name or _field_of(param.name, known)
            if field_name is None:
                unmapped.append(f"{command} --{param.name}")
                continue
            used[command].add(field_name)
            want = known[field_name]
            if param.required:
                if want is not MISSING:
                    wrong.append(f"{command} {param.name}: required, but {field_name} defaults to {want!r}")
                continue
            if spell is not None:
                want = spell(want)
            got = getattr(param.default, "value", param.default)  # an Enum choice by its value
            if got != want or type(got) is not type(want):
                wrong.append(f"{command} --{param.name}: {got!r} on the CLI, {want!r} in {field_name}")
    assert not unmapped, f"options with no config field (map them or list them in NOT_FIELDS): {unmapped}"
    assert not wrong, "CLI defaults that differ from their config fields:\n" + "\n".join(wrong)
    for command, cls in CONFIGS.items():
        unset = set(_field_defaults(cls)) - used[command]
        assert unset == CONFIG_ONLY[command], (
            f"{command}: fields no option sets {sorted(unset)}; CONFIG_ONLY says {sorted(CONFIG_ONLY[command])}")


def test_train_recipe_is_trains_flow_default():
    flow = defaults(TrainConfig).flow
    assert (flow.context_noise, flow.logit_mean) == (0.1, 0.5)  # the recipe study (docs/design-notes.md)
    assert TrainConfig(store="s", out="o").flow == flow


def test_help_imports_neither_torch_nor_diffusers():
    script = ("import sys\nfrom typer.testing import CliRunner\nfrom cli.main import app\n"
              "for args in ([], ['train'], ['encode'], ['vae', 'train'], ['demo']):\n"
              "    assert CliRunner().invoke(app, [*args, '--help']).exit_code == 0, args\n"
              "print(sorted(m for m in ('torch', 'diffusers', 'colossalai') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
