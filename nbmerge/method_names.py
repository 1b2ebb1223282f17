"""Method names on a command line (``nbmerge merge``, ``%merge``): nbmerge's and mergekit's, case-insensitive.

A name is looked up as written, then lower-cased with ``-`` read as ``_``. An nbmerge method of that name runs
unless the line's flags name a parameter it lacks and mergekit's method of that name takes (``linear --weights``
is mergekit's weighted average, not nbmerge's two-model interpolation); a mergekit name nbmerge does not register
(``dare_ties``, ``della_linear``, ...) maps as a recipe maps it (``nbmerge.recipes.MERGEKIT``, one place): its
parameters are mergekit's, as flags, a per-model one given once for every model or once per model, comma-separated,
and ``--dtype`` is mergekit's compute dtype. An unknown name gets a "did you mean" over both sets of names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from nbmerge.errors import ParameterError
from nbmerge.recipes import MERGEKIT, MergeCall, MergekitMethod, from_mergekit

WEIGHT_ALIAS = "weights"  # nbmerge's spelling of mergekit's per-model "weight"


@dataclass(frozen=True)
class MethodChoice:
    """What a command line's method name runs: nbmerge's method ``name``, or (``mergekit`` true) mergekit's
    method ``name`` mapped as its recipe would be."""

    name: str
    mergekit: bool = False

    @property
    def spec(self) -> MergekitMethod:
        return MERGEKIT[self.name]


def choose_method(name: str, words: list[str]) -> MethodChoice:
    """The method a line names (``words``: the rest of the line, whose ``--flags`` decide between nbmerge's and
    mergekit's method of one name); ParameterError with a "did you mean" for an unknown name."""
    from nbmerge.plugins import all_methods

    methods = all_methods()
    folded = name.lower().replace("-", "_")
    ours = name if name in methods else folded if folded in methods else None
    theirs = folded if folded in MERGEKIT else None
    if ours is not None and theirs is not None:
        declared = {param.name for param in methods[ours].params}
        flags = _flag_names(words)
        if any(key not in declared and _mergekit_key(key) in _mergekit_keys(MERGEKIT[theirs]) for key in flags):
            return MethodChoice(theirs, mergekit=True)
    if ours is not None:
        return MethodChoice(ours)
    if theirs is not None:
        return MethodChoice(theirs, mergekit=True)
    raise ParameterError(unknown_method_message(name, sorted(methods)))


def unknown_method_message(name: str, registered: list[str]) -> str:
    """``nbmerge: unknown merge method 'x'; did you mean 'y' (...)? (...)`` over nbmerge's and mergekit's names."""
    folded = name.lower().replace("-", "_")
    candidates = sorted(set(registered) | set(MERGEKIT))
    close = difflib.get_close_matches(folded, candidates, n=1, cutoff=0.6)
    hint = ""
    if close:
        guess = close[0]
        hint = f"; did you mean {guess!r}"
        if guess not in registered:
            hint += f" (mergekit's; {mergekit_equivalent(guess)})"
        hint += "?"
    return (f"nbmerge: unknown merge method {name!r}{hint} (registered methods: {', '.join(registered)}; mergekit's "
            f"names: {', '.join(sorted(set(MERGEKIT) - set(registered)))})")


def mergekit_equivalent(name: str) -> str:
    """mergekit's method in nbmerge's terms, e.g. "nbmerge's dare with combine='ties'"."""
    spec = MERGEKIT[name]
    try:
        params = spec.params(dict(spec.shared), {key: [default] for key, default in spec.per_model.items()}, 1)
    except Exception:  # noqa: BLE001 - a method whose mapping needs real values: name the method only
        params = {}
    shown = {key: params[key] for key in ("combine", "merge_func", "trim_scope") if key in params}
    extra = " with " + ", ".join(f"{key}={value!r}" for key, value in shown.items()) if shown else ""
    return f"nbmerge's {spec.method}{extra}"


def mergekit_flags(spec: MergekitMethod) -> list[str]:
    """The parameter names a mergekit method takes as flags (per-model ``weight`` also as ``weights``)."""
    keys = list(dict.fromkeys([*spec.shared, *spec.per_model]))
    return keys + ([WEIGHT_ALIAS] if "weight" in spec.per_model else [])


def mergekit_line_call(name: str, models: list[str], base: str | None, values: dict[str, Any],
                       dtype: str | None = None, out_dtype: str | None = None) -> MergeCall:
    """mergekit's ``name`` over ``models`` (and ``base``) with the line's parameter values (text; a per-model one:
    one value for all, or one per model separated by commas), as the equivalent recipe parses: the base joins the
    models when it is not among them, as mergekit adds it."""
    spec = MERGEKIT[name]
    shared, own = {}, [{} for _ in models]
    for key, text in values.items():
        if text is None:
            continue
        key = _mergekit_key(key)
        parts = [_value(part) for part in str(text).split(",")]
        if key in spec.per_model and len(parts) > 1:
            if len(parts) != len(models):
                raise ParameterError(f"{name}: --{key.replace('_', '-')} has {len(parts)} values for {len(models)} "
                                     f"models (give one for all, or one per model)")
            for entry, part in zip(own, parts):
                entry[key] = part
        elif len(parts) == 1:
            shared[key] = parts[0]
        else:
            raise ParameterError(f"{name}: --{key.replace('_', '-')} takes one value, got {text!r}")
    entries = [{"model": model, **({"parameters": given} if given else {})} for model, given in zip(models, own)]
    if base is not None and base not in models:
        entries.append({"model": base})
    config = {"merge_method": name, "models": entries, **({"parameters": shared} if shared else {}),
              **({"base_model": base} if base is not None else {}), **({"dtype": dtype} if dtype else {}),
              **({"out_dtype": out_dtype} if out_dtype else {})}
    from nbmerge.errors import RecipeError

    try:
        return from_mergekit(config)
    except RecipeError as exc:
        raise ParameterError(str(exc).replace("recipe: ", f"{name} (mergekit's): ", 1)) from None


def _mergekit_keys(spec: MergekitMethod) -> set[str]:
    return set(spec.shared) | set(spec.per_model)


def _mergekit_key(key: str) -> str:
    key = key.replace("-", "_")
    return "weight" if key == WEIGHT_ALIAS else key


def _flag_names(words: list[str]) -> list[str]:
    return [word[2:].split("=")[0].replace("-", "_") for word in words if word.startswith("--") and len(word) > 2]


def _value(text: str) -> Any:
    """A flag's value as a number or true/false where it reads as one, else the text."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
