"""Search spaces in the Hydra Optuna sweeper's grammar, parsed once into neutral
`Dimension`s, which `to_optuna` (phitune's sweeper) and phitune.azure.sweep_job (Azure
ML sweep jobs) translate, so both backends accept exactly the same expressions with
the same errors. As Optuna distributions:

    interval(0.1, 2.0)            FloatDistribution(0.1, 2.0)
    int(interval(1, 8))           IntDistribution(1, 8)             (both ends included)
    tag(log, interval(1e-4, 1))   FloatDistribution(1e-4, 1, log=True)
    tag(log, int(interval(4, 64)))  IntDistribution(4, 64, log=True)
    choice(1, 2, 4)  /  1,2,4     CategoricalDistribution([1, 2, 4])
    range(1, 4)                   IntDistribution(1, 3)             (stop excluded, as in Hydra)
    range(1, 10, 3)               IntDistribution(1, 7, step=3)
    range(0.1, 0.5, 0.1)          FloatDistribution(0.1, 0.4, step=0.1)
    shuffle(range(...))           CategoricalDistribution(values)

`range` keeps Hydra's meaning (Python's: the stop is not a value), so a command line
means the same values under the basic sweeper and this one. Strings are parsed by
Hydra's own OverridesParser; anything else (globs, lists, dicts) is refused with a
message that names the parameter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from optuna.distributions import BaseDistribution

# Floats from range() are rounded to this many significant digits so that
# range(0.1, 0.5, 0.1) ends at 0.4, not 0.30000000000000004 + 0.1.
_FLOAT_DIGITS = 12


class SearchSpaceError(PhituneError):
    """A search-space string that is not a search space this grammar allows."""


@dataclass(frozen=True)
class Dimension:
    """One searched parameter, independent of the optimiser that samples it.

    kind "float" or "int": [low, high], both included; `step` is None for a continuous
    interval (int(interval()) has step 1), else the grid step; `enumerated` says the
    values came from range(), i.e. the user listed a finite set. kind "choice": `choices`.
    """

    kind: str  # float | int | choice
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    enumerated: bool = False
    choices: tuple = ()

    def values(self, name: str) -> list:
        """Every value of a discrete dimension (grid sampling, Azure's choice)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(self.low, self.high + 1, self.step))
        if self.kind == "float" and self.step is not None:
            n = int(round((self.high - self.low) / self.step)) + 1
            return [_round(self.low + i * self.step) for i in range(n)]
        raise SearchSpaceError(f"sampler grid needs a discrete search space; {name!r} is continuous "
                               "(use choice() or range() for it)")


def to_optuna(dim: Dimension) -> "BaseDistribution":
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dim.kind == "choice":
        return CategoricalDistribution(list(dim.choices))
    if dim.kind == "int":
        return IntDistribution(int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return FloatDistribution(float(dim.low), float(dim.high), step=dim.step, log=dim.log)


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_override(name: str, text: str) -> "Override":
    from hydra.errors import HydraException

    try:
        return _parser().parse_override(f"{name}={text}")
    except HydraException as exc:
        detail = " ".join(str(exc).split())
        raise SearchSpaceError(f"search space for {name!r}: cannot parse {text!r}: {detail}") from None


def parse_dimension(name: str, text: str) -> Dimension:
    """One `hydra.sweeper.params` entry -> its Dimension."""
    text = text.strip()
    override = parse_override(name, text)
    if not override.is_sweep_override():
        raise SearchSpaceError(f"search space for {name!r}: {text!r} is a single value, not a search space "
                               "(use interval(), int(interval()), tag(log, ...), choice() or range())")
    return dimension_from_override(override)


def parse_space(params: dict[str, str]) -> dict[str, "BaseDistribution"]:
    """{name: search-space string} -> {name: Optuna distribution}, in the given order."""
    return {str(name): to_optuna(parse_dimension(str(name), str(text))) for name, text in params.items()}


def dimension_from_override(override: "Override") -> Dimension:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    name = override.get_key_element()
    value = override.value()
    text = (override.input_line or "").split("=", 1)[-1].strip() or str(value)
    log = "log" in (getattr(value, "tags", None) or set())

    def fail(why: str) -> SearchSpaceError:
        return SearchSpaceError(f"search space for {name!r}: {text}: {why}")

    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low is None or high is None or not low < high:
            raise fail("the lower bound must be below the upper bound")
        if log and low <= 0:
            raise fail("a log scale needs a lower bound above 0")
        if isinstance(low, int) and isinstance(high, int):  # int(interval(...))
            return Dimension("int", int(low), int(high), step=1, log=log)
        return Dimension("float", float(low), float(high), log=log)

    if isinstance(value, RangeSweep) and not value.shuffle:
        values = list(override.sweep_iterator())
        if not values:
            raise fail("the range is empty")
        # A sampler does not care about order: range(5, 0, -1) is the same set as range(1, 6).
        low, high, step = min(values), max(values), abs(value.step)
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            if log and step != 1:
                raise fail("a log scale needs step 1 (Optuna's rule for integers)")
            if len(values) == 1:
                return Dimension("choice", choices=tuple(values))
            return Dimension("int", int(low), int(high), step=int(step), log=log, enumerated=True)
        if log:
            raise fail("a log scale does not take a float step; use tag(log, interval(a, b))")
        low, high, step = (_round(float(v)) for v in (low, high, step))
        if len(values) == 1:
            return Dimension("choice", choices=(low,))
        return Dimension("float", low, high, step=step, enumerated=True)

    if isinstance(value, (ChoiceSweep, RangeSweep)):  # choice(), a,b,c, shuffle(range())
        if log:
            raise fail("log applies to interval() and range(), not to a choice")
        choices = list(override.sweep_iterator())
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise fail(f"choice values must be numbers, strings, booleans or null; got {c!r}")
        if not choices:
            raise fail("no value to choose from")
        if len(set(map(repr, choices))) != len(choices):
            raise fail("a value appears twice")
        if getattr(value, "shuffle", False):
            # shuffle() only reorders; a fixed order keeps a seeded sampler reproducible.
            try:
                choices = sorted(choices)
            except TypeError:
                choices = sorted(choices, key=repr)
        return Dimension("choice", choices=tuple(choices))

    raise fail("not a search space this sweeper supports (interval, int(interval), tag(log, ...), choice, range)")


def _round(x: float) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, _FLOAT_DIGITS - 1 - int(math.floor(math.log10(abs(x)))))


def grid_values(name: str, dist: "BaseDistribution") -> list:
    """Every value of a discrete Optuna distribution, for the grid sampler."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return Dimension("choice", choices=tuple(dist.choices)).values(name)
    kind = "float" if isinstance(dist, FloatDistribution) else "int"
    return Dimension(kind, dist.low, dist.high, step=dist.step, log=dist.log).values(name)


def suggest(trial, name: str, dist: "BaseDistribution") -> Any:
    """Sample `name` from `dist` through the public Trial API (a retried trial keeps its value)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise TypeError(f"unsupported distribution for {name!r}: {dist!r}")


# -- values back to override strings ------------------------------------------------------

def quote(text: str) -> str:
    """A string as a single-quoted Hydra override value: parsed back verbatim, never interpolated."""
    # Hydra's rule: inside quotes only backslashes that precede a quote (or the closing
    # quote) are escapes; `\${` keeps OmegaConf from resolving an interpolation.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    escaped = escaped.replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


def format_value(value: Any) -> str:
    """A Python value as the right-hand side of an override (`key=<this>`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-trip form, e.g. 0.0012 or 1e-05
    return quote(str(value))


def override(name: str, value: Any) -> str:
    return f"{name}={format_value(value)}"


def describe(space_text: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in space_text.items())
