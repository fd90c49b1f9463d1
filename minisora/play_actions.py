"""Which keys play which actions in `minisora play`: the action ids of the run's dataset, named and bound to keys.

A run records the dataset it was trained on (its pipeline description's `source`: the clip kind and
the clip root, minisora.run_dir) and the number of action ids its model embeds. The names come from,
in order:
1. minisora's synthetic clips (the root holds synthetic.json): the renderer's actions,
   minisora.data.synthetic.DMLAB_ACTIONS or MINECRAFT_ACTIONS;
2. the dataset card (data_manifests/<kind>.json, `actions.names`), when it names them;
3. otherwise "action i": TECO's cards do not document what the ids mean.
Named actions get the keys of a first-person game (arrows / WASD, Space to jump); unnamed ones the
digit keys 1, 2, ... With no key held the idle action is sent: the one named "noop", else the
model's learned null action (-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NULL_ACTION = -1  # the model's learned "no action" (VideoDiT.condition)

# key codes (KeyboardEvent.code) for each action name a dataset may use
KEYS_BY_NAME: dict[str, tuple[str, ...]] = {
    "forward": ("ArrowUp", "KeyW"),
    "backward": ("ArrowDown", "KeyS"),
    "turn_left": ("ArrowLeft", "KeyA"),
    "turn_right": ("ArrowRight", "KeyD"),
    "strafe_left": ("KeyQ",),
    "strafe_right": ("KeyE",),
    "jump": ("Space",),
    "look_up": ("KeyR",),
    "look_down": ("KeyF",),
}
IDLE_NAMES = ("noop", "no_op", "idle")


@dataclass(frozen=True)
class ActionSet:
    """The action ids a model takes, their names, their keys and the idle action."""
    names: tuple[str, ...]  # names[i]: action id i
    keys: dict[str, int]  # key code -> action id
    idle: int  # sent when no key is held: the noop id, or NULL_ACTION
    source: str  # where the names come from, for the page

    def label(self, action: int) -> str:
        return "none (null action)" if action == NULL_ACTION else f"{action}: {self.names[action]}"

    def check(self, action: int) -> int:
        """`action` as an int, if it is an id of this set or the null action; else ValueError."""
        action = int(action)
        if action != NULL_ACTION and not 0 <= action < len(self.names):
            raise ValueError(f"action {action} must be in [0, {len(self.names)}) or {NULL_ACTION}")
        return action

    def describe(self) -> dict:
        """The set as the page shows it: per action its id, name and keys, the idle action and the source."""
        by_action = {i: [k for k, a in self.keys.items() if a == i] for i in range(len(self.names))}
        return {"actions": [{"id": i, "name": n, "keys": by_action[i]} for i, n in enumerate(self.names)],
                "keys": self.keys, "idle": self.idle, "idle_label": self.label(self.idle), "source": self.source}


def _dataset_names(source: dict) -> tuple[tuple[str, ...] | None, str]:
    """(action names, where they come from) for the dataset a run was trained on; (None, why) if unknown."""
    kind, root = source.get("kind"), source.get("root")
    if root and (Path(root) / "synthetic.json").is_file() and kind in ("dmlab", "minecraft"):
        from minisora.data.synthetic import DMLAB_ACTIONS, MINECRAFT_ACTIONS

        names = DMLAB_ACTIONS if kind == "dmlab" else MINECRAFT_ACTIONS
        return names, f"minisora's synthetic {kind} clips ({root})"
    if kind:
        from minisora.data import load_dataset_card

        try:
            names = load_dataset_card(kind).get("actions", {}).get("names")
        except (OSError, ValueError):
            names = None
        if names:
            return tuple(names), f"the {kind} dataset card"
        return None, f"the {kind} dataset card does not name its actions"
    return None, "the run does not record its dataset"


def action_set(source: dict | None, num_actions: int) -> ActionSet:
    """The ActionSet of a model with `num_actions` action ids trained on `source` (a run's pipeline `source`)."""
    names, where = _dataset_names(source or {})
    names = tuple((names or ())[:num_actions]) + tuple(f"action {i}" for i in range(len(names or ()), num_actions))
    keys: dict[str, int] = {}
    for i, name in enumerate(names):
        for code in KEYS_BY_NAME.get(name, ()):
            keys.setdefault(code, i)
    idle = next((i for i, n in enumerate(names) if n in IDLE_NAMES), NULL_ACTION)
    free = (i for i, n in enumerate(names) if i != idle and not any(a == i for a in keys.values()))
    for digit, i in zip(range(1, 10), free):  # unnamed (or keyless) actions: the digit keys
        keys[f"Digit{digit}"] = i
    return ActionSet(names, keys, idle, where)
