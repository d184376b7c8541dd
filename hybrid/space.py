"""The search space: knob declarations from search_space.yaml, checked against a train.py."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from harness.knobs import find_knobs

TYPES = ("int", "float", "categorical")
SOURCE_TYPE = {"int": "int", "float": "float", "categorical": "str"}


class SpaceError(ValueError):
    """A malformed search space, or a config that does not fit it."""


@dataclass(frozen=True)
class Knob:
    name: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def distribution(self) -> BaseDistribution:
        if self.type == "categorical":
            return CategoricalDistribution(self.choices)
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def parse(self, text: str) -> Any:
        """A value given as text (`--set DEPTH=6`) in this knob's type."""
        if self.type == "categorical":
            return text
        try:
            return int(text) if self.type == "int" else float(text)
        except ValueError:
            raise SpaceError(f"{self.name} is {self.type}, got {text!r}") from None

    def check(self, value: Any) -> Any:
        """The value, if it is of this knob's type and inside its range; SpaceError otherwise."""
        if self.type == "categorical":
            if value not in self.choices:
                raise SpaceError(f"{self.name}={value!r} is not one of {', '.join(map(str, self.choices))}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpaceError(f"{self.name} is {self.type}, got {type(value).__name__} {value!r}")
        if self.type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise SpaceError(f"{self.name} is int, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise SpaceError(f"{self.name} must be finite, got {value!r}")
        if not self.low <= value <= self.high:
            raise SpaceError(f"{self.name}={value} is outside its range [{self.low}, {self.high}]")
        return value

    def clamp(self, value: Any) -> Any:
        """The nearest valid value (for configs proposed by an LLM); SpaceError if there is none."""
        if self.type == "categorical":
            return self.check(value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SpaceError(f"{self.name} is {self.type}, got {value!r}") from None
        if not math.isfinite(number):
            raise SpaceError(f"{self.name} must be finite, got {value!r}")
        number = min(max(number, self.low), self.high)
        return int(round(number)) if self.type == "int" else number

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "name"}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        return d


def knob_from_dict(name: str, d: dict[str, Any]) -> Knob:
    """A Knob from its declaration; SpaceError says what is wrong with a malformed one."""
    if not isinstance(d, dict):
        raise SpaceError(f"knob {name}: expected a mapping like {{type: int, low: 1, high: 8, default: 4}}")
    unknown = set(d) - {"type", "low", "high", "log", "choices", "default"}
    if unknown:
        raise SpaceError(f"knob {name}: unknown field(s) {', '.join(sorted(unknown))}")
    kind = d.get("type")
    if kind not in TYPES:
        raise SpaceError(f"knob {name}: unknown type {kind!r} (use one of {', '.join(TYPES)})")
    if "default" not in d:
        raise SpaceError(f"knob {name}: no default")
    if kind == "categorical":
        choices = d.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"knob {name}: a categorical knob needs a non-empty list of choices")
        knob = Knob(name, kind, d["default"], choices=tuple(choices))
    else:
        low, high = d.get("low"), d.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise SpaceError(f"knob {name}: low and high must be numbers")
        if low >= high:
            raise SpaceError(f"knob {name}: low ({low}) must be below high ({high})")
        log = bool(d.get("log", False))
        if log and low <= 0:
            raise SpaceError(f"knob {name}: a log-scale range must be positive (low={low})")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"knob {name}: an int knob needs integer bounds")
        knob = Knob(name, kind, d["default"], low=low, high=high, log=log)
    try:
        return replace(knob, default=knob.check(knob.default))
    except SpaceError as e:
        raise SpaceError(f"knob {name}: default is invalid: {e}") from None


@dataclass(frozen=True)
class SearchSpace:
    knobs: dict[str, Knob]

    @property
    def names(self) -> list[str]:
        return list(self.knobs)

    def defaults(self) -> dict[str, Any]:
        return {name: knob.default for name, knob in self.knobs.items()}

    def distributions(self) -> dict[str, BaseDistribution]:
        return {name: knob.distribution() for name, knob in self.knobs.items()}

    def check(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config with every value checked; unknown knobs are an error."""
        unknown = sorted(set(config) - set(self.knobs))
        if unknown:
            raise SpaceError(f"unknown knob(s) {', '.join(unknown)}; the space has {', '.join(self.knobs)}")
        return {name: self.knobs[name].check(value) for name, value in config.items()}

    def complete(self, config: dict[str, Any]) -> dict[str, Any]:
        """Defaults for every knob, overridden by the (checked) config."""
        return {**self.defaults(), **self.check(config)}

    def clamp(self, config: dict[str, Any]) -> dict[str, Any]:
        """Project a loose config (an LLM's) into the space: unknown knobs dropped, values clamped, gaps defaulted."""
        return {name: knob.clamp(config[name]) if name in config else knob.default for name, knob in self.knobs.items()}

    def project(self, config: dict[str, Any]) -> dict[str, Any]:
        """A config of another space moved into this one: shared knobs kept (clamped), new knobs at their defaults."""
        return self.clamp({k: v for k, v in config.items() if k in self.knobs})

    def with_changes(self, added: dict[str, Knob] | None = None, removed: list[str] | None = None) -> SearchSpace:
        knobs = {k: v for k, v in self.knobs.items() if k not in set(removed or [])}
        knobs.update(added or {})
        return SearchSpace(knobs)

    def to_dict(self) -> dict[str, Any]:
        return {name: knob.to_dict() for name, knob in self.knobs.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        if not isinstance(d, dict) or not d:
            raise SpaceError("a search space needs at least one knob")
        return cls({name: knob_from_dict(name, spec) for name, spec in d.items()})


def load_space(path: str | Path, profile: str = "gpu") -> SearchSpace:
    """The space declared in a search_space.yaml, with the profile's overrides applied."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpaceError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("knobs"), dict):
        raise SpaceError(f"{path}: expected a top-level 'knobs:' mapping")
    declared = {name: dict(spec) if isinstance(spec, dict) else spec for name, spec in doc["knobs"].items()}
    _checked(declared, path)  # the base ranges must hold whatever the profile overrides
    overrides = (doc.get("profiles") or {}).get(profile) or {}
    if not isinstance(overrides, dict):
        raise SpaceError(f"{path}: profiles.{profile} must be a mapping of knob overrides")
    for name, spec in overrides.items():
        if name not in declared:
            raise SpaceError(f"{path}: profiles.{profile}.{name} overrides a knob that 'knobs:' does not declare")
        if not isinstance(spec, dict):
            raise SpaceError(f"{path}: profiles.{profile}.{name} must be a mapping")
        declared[name] = {**declared[name], **spec}
    return _checked(declared, path)


def _checked(declared: dict[str, Any], path: Path) -> SearchSpace:
    """The space of these declarations; SpaceError naming the file if one is malformed."""
    try:
        return SearchSpace.from_dict(declared)
    except SpaceError as e:
        raise SpaceError(f"{path}: {e}") from None


def check_against_code(space: SearchSpace, code: str) -> None:
    """SpaceError unless every declared knob exists in train.py as an assignment of the matching type."""
    found = find_knobs(code)
    for name, knob in space.knobs.items():
        if name not in found:
            raise SpaceError(f"knob {name} is declared in the search space but train.py has no top-level {name} = ...")
        want = SOURCE_TYPE[knob.type]
        have = found[name].type
        if have != want and not (want == "float" and have == "int"):
            raise SpaceError(f"knob {name} is declared {knob.type} but train.py assigns a {have}")
