"""Typed method parameters: one declaration drives validation, CLI flags, magic arguments and widget controls.

A parameter is declared once by its method (``Param``); ``validate_params`` turns user input (Python values or
command-line text) into checked, canonical values before any tensor is read, and suggests the closest valid
name for a misspelled one.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from nbmerge.errors import ParameterError, shown

KINDS = ("float", "int", "bool", "choice", "floats", "schedule", "layers")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    kind:
      - ``float`` / ``int``: a number in [low, high] (bounds open where ``*_inclusive`` is false).
      - ``bool``.
      - ``choice``: one of ``choices`` (strings or booleans).
      - ``floats``: a list of numbers, one per model when ``per_model`` (e.g. weights); ``None`` allowed as default.
      - ``schedule``: a number, a list of anchors interpolated over layer depth, or a mergekit-style list of
        ``{"filter": substring, "value": number or anchors}`` entries with one entry without filter as default.
      - ``layers``: a non-negative layer count, or ``"half"`` (= L // 2 of L layers).
    """

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple = ()
    per_model: bool = False
    grid: tuple = ()  # values a benchmark's tuned run tries on the validation split (``nbmerge bench``)
    # what ``nbmerge demo`` passes: a typical value of a parameter the method requires (nearswap's t), or a cheaper
    # one than the default where the default takes minutes (WUDI's 400 Adam steps per matrix)
    example: Any = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"parameter {shown(self.name)}: unknown kind {shown(self.kind)}, expected one of {KINDS}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"parameter {shown(self.name)}: a choice parameter needs choices")

    # -- describing -------------------------------------------------------------------------------------------
    def range_text(self) -> str:
        """The valid values in words, e.g. ``[0, 1)`` or ``one of sum, count``."""
        if self.kind == "choice":
            return "one of " + ", ".join(_show(c) for c in self.choices)
        if self.low is None and self.high is None:
            return ""
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        low = "-inf" if self.low is None else _show(self.low)
        high = "inf" if self.high is None else _show(self.high)
        return f"{left}{low}, {high}{right}"

    def describe(self) -> dict:
        """A JSON-friendly description (used by ``nbmerge methods --json`` and the notebook layer)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "default": _jsonable(self.default),
            "help": self.help,
            "low": self.low,
            "high": self.high,
            "low_inclusive": self.low_inclusive,
            "high_inclusive": self.high_inclusive,
            "choices": [_jsonable(c) for c in self.choices],
            "per_model": self.per_model,
            "grid": [_jsonable(v) for v in self.grid],
            "example": _jsonable(self.example),
        }

    def plain(self, value: Any) -> Any:
        """A checked value in plain JSON form that ``check`` accepts again (for recipes and reports)."""
        if is_schedule(value):
            if len(value) == 1:
                anchors = value[0][1]
                return anchors[0] if len(anchors) == 1 else list(anchors)
            return [{"filter": f, "value": a[0] if len(a) == 1 else list(a)} if f is not None
                    else {"value": a[0] if len(a) == 1 else list(a)} for f, a in value]
        if isinstance(value, tuple):
            return [self.plain(v) for v in value]
        return value

    # -- checking ---------------------------------------------------------------------------------------------
    def check(self, value: Any, method: str) -> Any:
        """Return ``value`` as this parameter's canonical type, or raise ParameterError naming method and parameter."""
        where = f"{method}: parameter {shown(self.name)}"
        if isinstance(value, str) and self.kind not in ("choice", "layers"):
            value = self.parse_text(value, method)
        if self.kind == "float":
            if self.per_model and isinstance(value, (list, tuple)) and value and not _filter_entries(value):
                return tuple(self._scalar_or_schedule(v, where) for v in value)  # one value per model
            return self._scalar_or_schedule(value, where)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
                raise ParameterError(f"{where} must be an integer, got {shown(value)}")
            return int(self._number(int(value), where))
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ParameterError(f"{where} must be true or false, got {shown(value)}")
            return value
        if self.kind == "choice":
            if isinstance(value, str):
                value = _text_choice(value, self.choices)
            if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices):
                raise ParameterError(f"{where} must be {self.range_text()}, got {shown(value)}")
            return value
        if self.kind == "floats":
            if value is None:
                return None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)) or not value:
                raise ParameterError(f"{where} must be a list of numbers, got {shown(value)}")
            if self.per_model:  # a model's entry may vary over depth and tensor kind
                return tuple(self._scalar_or_schedule(v, where) for v in value)
            return tuple(self._number(_as_float(v, where), where) for v in value)
        if self.kind == "schedule":
            return self._schedule(value, where)
        if self.kind == "layers":
            if value == "half":
                return "half"
            if isinstance(value, str):
                value = self.parse_text(value, method)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(f"{where} must be a non-negative integer or 'half', got {shown(value)}")
            return value
        raise AssertionError(self.kind)

    def parse_text(self, text: str, method: str) -> Any:
        """Parse command-line text: numbers, true/false, comma lists, or JSON for lists and schedules."""
        where = f"{method}: parameter {shown(self.name)}"
        text = text.strip()
        if self.kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ParameterError(f"{where} must be true or false, got {shown(text)}")
        if self.kind == "choice":
            return _text_choice(text, self.choices)
        if self.kind == "layers" and text == "half":
            return "half"
        per_model_list = self.kind == "float" and self.per_model
        if (self.kind in ("floats", "schedule") or per_model_list) and not text.startswith(("[", "{")) and "," in text:
            return [_as_float(part.strip(), where) for part in text.split(",") if part.strip()]
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # not JSON, an integer of too many digits, nesting too deep
            raise ParameterError(f"{where}: cannot read {shown(text)} as {self.kind}") from None

    def _number(self, value: float, where: str) -> float:
        if math.isnan(value):
            raise ParameterError(f"{where} must be a number, got NaN")
        too_low = self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive))
        too_high = self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive))
        if too_low or too_high:
            raise ParameterError(f"{where} must be in {self.range_text()}, got {_show(value)}")
        return value

    def _scalar_or_schedule(self, value: Any, where: str) -> float | tuple:
        """A number, or (given anchors or filter entries) a canonical schedule resolved per tensor by the engine;
        a schedule of one number everywhere is that number."""
        if not isinstance(value, (list, tuple, Mapping)):
            return self._number(_as_float(value, where), where)
        schedule = self._schedule([value] if isinstance(value, Mapping) else value, where)
        return schedule[0][1][0] if len(schedule) == 1 and len(schedule[0][1]) == 1 else schedule

    def _schedule(self, value: Any, where: str) -> tuple:
        """Canonical schedule: a tuple of (filter or None, anchors tuple); exactly one entry has no filter."""
        entries = value if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping) else None
        if entries is None:
            return ((None, self._anchors(value, where)),)
        canonical = []
        for entry in entries:
            if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
                raise ParameterError(f"{where}: each schedule entry must be {{'filter': ..., 'value': ...}}, "
                                     f"got {shown(entry)}")
            tensor_filter = entry.get("filter")
            if tensor_filter is not None and not isinstance(tensor_filter, str):
                raise ParameterError(f"{where}: a schedule filter must be a string, got {shown(tensor_filter)}")
            canonical.append((tensor_filter, self._anchors(entry["value"], where)))
        if sum(1 for f, _ in canonical if f is None) != 1:
            raise ParameterError(f"{where}: a filtered schedule needs exactly one entry without 'filter' "
                                 f"(the value for tensors no filter matches)")
        # The default entry goes last so that filters are tried first, in the order given.
        return tuple([e for e in canonical if e[0] is not None] + [e for e in canonical if e[0] is None])

    def _anchors(self, value: Any, where: str) -> tuple:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ParameterError(f"{where}: an empty list of anchors")
        return tuple(self._number(_as_float(v, where), where) for v in values)


def validate_params(method_name: str, declared: tuple[Param, ...], given: Mapping[str, Any]) -> dict:
    """Check user parameters against the declaration; fill defaults; reject unknown names with a suggestion."""
    by_name = {p.name: p for p in declared}
    for name in given:
        if name not in by_name:
            raise ParameterError(unknown_parameter_message(method_name, name, list(by_name)))
    checked = {}
    for param in declared:
        value = given[param.name] if param.name in given else param.default
        checked[param.name] = value if value is None and param.default is None else param.check(value, method_name)
    return checked


def unknown_parameter_message(owner: str, name: str, valid: list[str], noun: str = "parameter",
                              listed_as: str = "valid parameters") -> str:
    """``owner: unknown <noun> 'name'; did you mean 'closest'? (<listed_as>: a, b, c)``."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {shown(close[0])}?" if close else ""
    listing = ", ".join(valid) if valid else "none"
    return f"{owner}: unknown {noun} {shown(name)}{hint} ({listed_as}: {listing})"


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterError(f"{where} must be a number, got {shown(value)}")
    try:
        return float(value)
    except ValueError:
        raise ParameterError(f"{where} must be a number, got {shown(value)}") from None


def _text_choice(text: str, choices: tuple) -> Any:
    for choice in choices:
        if isinstance(choice, bool) and text.lower() == str(choice).lower():
            return choice
        if choice == text:
            return choice
    return text


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _filter_entries(value: Any) -> bool:
    """Whether a list is a filtered schedule ([{filter: ..., value: ...}, ...]) rather than plain values."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def is_schedule(value: Any) -> bool:
    """Whether a checked value is a canonical schedule: a tuple of (filter or None, anchors) pairs."""
    return (isinstance(value, tuple) and bool(value)
            and all(isinstance(e, tuple) and len(e) == 2 and (e[0] is None or isinstance(e[0], str))
                    and isinstance(e[1], tuple) for e in value))


def holds_schedule(value: Any) -> bool:
    """Whether a checked value varies over tensors: a schedule, or per-model values with a schedule among them."""
    return is_schedule(value) or (isinstance(value, tuple) and any(is_schedule(v) for v in value))


def resolved(value: Any, tensor_name: str, layer: int | None, num_layers: int) -> Any:
    """A checked value for one tensor: schedules (also inside per-model tuples) replaced by their value there."""
    if is_schedule(value):
        return schedule_value(value, tensor_name, layer, num_layers)
    if isinstance(value, tuple):
        return tuple(resolved(v, tensor_name, layer, num_layers) for v in value)
    return value


def schedule_corners(value: Any) -> list:
    """Plain values bounding a checked value over all tensors: [value] for a fixed value, else [the value with
    every schedule at its smallest anchor, ... at its largest] (a schedule interpolates between its anchors)."""
    if not holds_schedule(value):
        return [value]

    def at(extreme, v):
        if is_schedule(v):
            return extreme(a for _, anchors in v for a in anchors)
        return tuple(at(extreme, item) for item in v) if isinstance(v, tuple) else v

    return [at(min, value), at(max, value)]


def schedule_value(schedule: tuple, tensor_name: str, layer: int | None, num_layers: int) -> float:
    """The value of a schedule for one tensor.

    The first entry whose filter is a substring of the tensor name wins, else the default entry. Its anchors are
    spread evenly over [0, 1] and interpolated piecewise-linearly at the tensor's depth: layer i of L layers sits
    at i / (L - 1), the one layer of a one-layer model or slice at 1 (as mergekit places it); tensors outside the
    layer stack (embeddings, final norm, head) take the first anchor.
    """
    anchors = next(a for f, a in schedule if f is None or f in tensor_name)
    if len(anchors) == 1 or layer is None:
        return anchors[0]
    position = layer / (num_layers - 1) if num_layers > 1 else 1.0
    scaled = position * (len(anchors) - 1)
    left = min(int(math.floor(scaled)), len(anchors) - 2)
    frac = scaled - left
    return anchors[left] * (1.0 - frac) + anchors[left + 1] * frac
