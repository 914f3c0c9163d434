"""What a sweep varies and what it fixes: hydra.sweeper.params merged with the command line.

    params (sweep file)            command line                  result
    train.epochs: range(1, 4)      train.epochs=range(1,3)       space: range(1,3)
    train.epochs: range(1, 4)      train.epochs=2                fixed: train.epochs=2
    train.max_steps: "12"          -                             fixed: train.max_steps=12
    -                              'train.lora.rank=choice(8,16)' space: choice(8,16)
    -                              sweep=lora, model=...          fixed (passed to every trial)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phitune.errors import PhituneError
from phitune.sweep import space as sp


@dataclass
class SweepPlan:
    space_text: dict[str, str]  # name -> search-space string, as written
    space: dict[str, Any]  # name -> optuna distribution
    launch_keys: dict[str, str]  # name -> override key (keeps a leading + or @package)
    fixed: list[str] = field(default_factory=list)  # overrides every trial gets


def plan_sweep(params: dict | None, arguments: list[str]) -> SweepPlan:
    """hydra.sweeper.params and the command line -> search space + fixed overrides.

    The command line wins: `train.epochs=range(1,3)` replaces the file's range for
    train.epochs, and `train.epochs=2` removes it from the space (every trial gets 2).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    space_text: dict[str, str] = {}
    launch_keys: dict[str, str] = {}
    fixed: dict[str, str] = {}  # key -> override line; dict keeps order, last one wins
    for name, value in (params or {}).items():
        name, text = str(name), _param_text(value)
        ov = sp.parse_override(name, text)
        if ov.is_sweep_override():
            space_text[name], launch_keys[name] = text, ov.get_key_element()
        else:
            fixed[name] = f"{name}={text}"
    try:
        parsed = OverridesParser.create().parse_overrides(list(arguments))
    except HydraException as exc:
        raise PhituneError(f"cannot parse the command line: {' '.join(str(exc).split())}") from None
    for ov in parsed:
        key = _param_name(ov)
        if ov.is_sweep_override():
            fixed.pop(key, None)
            space_text[key] = ov.input_line.split("=", 1)[1]
            launch_keys[key] = ov.get_key_element()
        else:
            space_text.pop(key, None)
            launch_keys.pop(key, None)
            fixed.pop(key, None)
            fixed[key] = ov.input_line
    dists = {}
    for name, text in space_text.items():
        dists[name] = sp.to_optuna(sp.parse_dimension(name, text))
    return SweepPlan(space_text, dists, launch_keys, list(fixed.values()))


def _param_text(value) -> str:
    # hydra.sweeper.params is Dict[str, str]; a plain dict (tests, Azure) may hold numbers.
    return value if isinstance(value, str) else sp.format_value(value)


def _param_name(ov) -> str:
    return ov.key_or_group + (f"@{ov.package}" if ov.package else "")
