"""The checks a spec's values go through: types, choices, knobs, ${ENV}, and Optuna classes' options.

Each refusal is a SpecError naming the file, the key path, the rule and the value.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from hpsearch.errors import SpecError
from hpsearch.vocab import pruner_class

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SHOWN_CHARS = 200  # a value's repr in a refusal is cut to this, so the message stays one paragraph


def brief(value: Any) -> str:
    """Return ``repr(value)``, cut short (saying how long it was) where it would not fit in a message."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS - 40]}... ({len(text):,} characters)"


class Checker:
    """Type checks that raise SpecError with the file, the key path, the rule and the value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, rule: str, value: Any) -> None:
        shown = "" if value is None else f", but got {brief(value)}"
        if len(where) > _SHOWN_CHARS:  # a key path holding a key too long to print whole
            where = where[:_SHOWN_CHARS - 40] + "..."
        raise SpecError(f"{self.source}: {where or 'the spec'}: {rule}{shown}.")

    def interpolate(self, raw: Any, where: str) -> Any:
        """Return ``raw`` with ${VAR} and ${VAR:-default} in strings replaced from the environment."""
        if isinstance(raw, dict):
            return {k: self.interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in raw.items()}
        if isinstance(raw, list):
            return [self.interpolate(v, f"{where}[{i}]") for i, v in enumerate(raw)]
        if not isinstance(raw, str) or "${" not in raw:
            return raw

        def replace(match: re.Match[str]) -> str:
            value = os.environ.get(match.group(1))
            if value is None:
                if match.group(2) is None:
                    raise SpecError(f"{self.source}: {where}: the environment variable {match.group(1)} is not set "
                                    f"(the value refers to it as ${{{match.group(1)}}}). Set it, or write "
                                    f"${{{match.group(1)}:-default}}.")
                return match.group(2)
            return value

        return _ENV_RE.sub(replace, raw)

    def mapping(self, raw: Any, where: str, *, required: tuple[str, ...] = (),
                optional: tuple[str, ...] | None = ()) -> dict[str, Any]:
        """Return ``raw`` as a dict; refuse a non-mapping, missing keys and (unless optional=None) unknown ones."""
        if not isinstance(raw, Mapping):
            self.fail(where, "must be a mapping (key: value)", raw)
        for key in raw:
            if not isinstance(key, str):
                self.fail(f"{where}.{key}" if where else str(key), "keys must be strings", key)
        if optional is not None:
            allowed = set(required) | set(optional)
            for key in raw:
                if key not in allowed:
                    path = f"{where}.{key}" if where else key
                    self.fail(path, f"unknown key {brief(key)}; expected one of {sorted(allowed)}", None)
        for key in required:
            if key not in raw or raw[key] is None:
                self.fail(f"{where}.{key}" if where else key, "is required", None)
        return dict(raw)

    def string(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw.strip():
            self.fail(where, "must be a non-empty string", raw)
        return raw

    def choice(self, raw: Any, where: str, choices: tuple[str, ...]) -> str:
        if isinstance(raw, str) and raw in choices:
            return raw
        self.fail(where, f"must be one of {list(choices)}", raw)
        raise AssertionError  # unreachable

    def boolean(self, raw: Any, where: str) -> bool:
        if not isinstance(raw, bool):
            self.fail(where, "must be true or false", raw)
        return raw

    def integer(self, raw: Any, where: str, low: int | None = None) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            self.fail(where, "must be an integer", raw)
        if low is not None and raw < low:
            self.fail(where, f"must be >= {low}", raw)
        return raw

    def number(self, raw: Any, where: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(raw, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                raw = float(raw)
            except ValueError:
                self.fail(where, "must be a number", raw)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            self.fail(where, "must be a finite number", raw)
        if (low is not None and raw < low) or (high is not None and raw > high):
            self.fail(where, f"must be between {low} and {high}", raw)
        return raw

    def knob_value(self, knob: Any, raw: Any, where: str) -> Any:
        if knob.kind == "float" and isinstance(raw, str):
            raw = self.number(raw, where)
        problem = knob.problem(raw)
        if problem:
            self.fail(where, f"{knob.name} {problem}", raw)
        return raw


def check_options(check: Checker, cls: type, owner: str, options: Mapping[str, Any], where: str,
                  reserved: set[str], *, build: bool = True) -> dict[str, Any]:
    """Return the options of an Optuna sampler or pruner class ``cls`` (named ``owner`` in messages), each
    checked against the class's signature (its name and its annotated type), then all of them by building
    the object once, as Optuna checks values there."""
    parameters = {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    allowed = [a for a in parameters if a not in reserved]
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key in reserved:
            check.fail(f"{where}.{key}", "is set by hpsearch (from study.seed and the space); remove it", value)
        if key not in parameters:
            check.fail(f"{where}.{key}", f"unknown option of {owner}; accepted options: {allowed}", value)
        checked[key] = _option_value(check, f"{where}.{key}", parameters[key].annotation, value, owner)
    if build:
        # The patient pruner wraps another, checked on its own: any pruner stands in for it here.
        args = (pruner_class("none")(),) if cls is pruner_class("patient") else ()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on experimental features are no problem of the spec
            try:
                cls(*args, **checked)
            except Exception as exc:  # noqa: BLE001 - whatever Optuna refuses, the spec is wrong
                check.fail(where, f"{owner} cannot be built from the options {checked}: {str(exc).rstrip('.')}",
                           None)
    return checked


# The types an option's annotation may name that YAML can give: (what to say, the test of a value).
_YAML_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
    "dict": ("a mapping", lambda v: isinstance(v, Mapping)),
    "Mapping": ("a mapping", lambda v: isinstance(v, Mapping)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "Sequence": ("a list", lambda v: isinstance(v, list)),
    "Any": ("anything", lambda v: True),
}


def _option_value(check: Checker, where: str, annotation: Any, value: Any, owner: str) -> Any:
    """Return ``value`` if it has a type the option's annotation allows (YAML's 1e-3 string read as a number)."""
    if annotation is inspect.Parameter.empty:
        return value
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    kinds = [_YAML_TYPES.get(alternative.split("[", 1)[0].strip()) for alternative in _union_members(text)]
    if "float" in _union_members(text) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if any(kind is not None and kind[1](value) for kind in kinds):
        return value
    words = list(dict.fromkeys(kind[0] for kind in kinds if kind is not None))
    if words in ([], ["null"]):  # a callable or an Optuna object, or nothing
        check.fail(where, f"takes a Python object ({text}), which a YAML spec cannot give; remove it", value)
    check.fail(where, f"must be {' or '.join(words)} ({owner} takes {text})", value)
    raise AssertionError  # unreachable


def _union_members(annotation: str) -> list[str]:
    """Return the members of a ``A | B[C | D]`` annotation, split only at its top level."""
    members, depth, start = [], 0, 0
    for i, char in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            members.append(annotation[start:i].strip())
            start = i + 1
    return [*members, annotation[start:].strip()]
