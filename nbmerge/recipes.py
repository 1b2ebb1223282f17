"""Merge recipes in YAML: mergekit's configuration format and nbmerge's own, both turned into one ``merge`` call.

nbmerge's spelling is the API's keywords (and the ``nbmerge_recipe.json`` every merge writes)::

    method: ties
    models: [ft-math/, ft-code/]          # or {name: model}
    base: base/
    params: {density: 0.3, trim_scope: tensor}
    out_dtype: bfloat16                   # also: out, device, shard_size, overwrite, allow_nonfinite

mergekit's (``merge_method``, ``models`` with per-model ``parameters``, ``base_model``, ``parameters``, ``dtype``,
one ``slices`` entry) maps onto nbmerge methods with mergekit's defaults and semantics:

=============== ====================================================================================
linear          weighted_average: weights = per-model weight, normalize (default true)
task_arithmetic task_arithmetic: weights = weight (÷ Σ weight when normalize), scaling = lambda (default 1)
ties            ties with trim_scope=tensor, sign=sum: density (per model, default 1),
                weights, merge_func = mean when normalize (default true) else sum, scaling = lambda
dare_linear     dare with combine=linear: drop_rate = 1 − density, rescale true → "l1" (mergekit's
                ‖τ‖₁ rescaling), weights (÷ Σ weight when normalize), scaling = lambda
dare_ties       dare with combine=ties (normalize must stay false, mergekit's default)
slerp           slerp: base_model is the t = 0 endpoint, t a number, anchors or filter list
model_stock     model_stock: base_model, two or more models, filter_wise (default false)
nearswap        nearswap: base_model and one model, t (required)
=============== ====================================================================================

DARE's masks are nbmerge's own seeded draws, so a dare merge equals mergekit's in distribution, not bit for bit.
Model references stay strings here; the caller resolves them (paths, or notebook variables in the magics).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from nbmerge.errors import RecipeError

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock",
                    "nearswap")
RUN_OPTIONS = ("out", "out_dtype", "device", "shard_size", "overwrite", "allow_nonfinite")
NBMERGE_KEYS = ("method", "models", "base", "params", *RUN_OPTIONS, "nbmerge_version", "plugin")
MERGEKIT_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype")
# mergekit options that change what a merge produces and that nbmerge does not do
MERGEKIT_UNSUPPORTED = {
    "tokenizer_source": "nbmerge copies the tokenizer files of the base (or first) model",
    "tokenizer": "nbmerge copies the tokenizer files of the base (or first) model",
    "chat_template": "nbmerge copies the tokenizer files of the base (or first) model",
    "modules": "per-module recipes",
}
# mergekit parameters that only change memory use, not the result
MERGEKIT_NO_EFFECT = ("int8_mask",)
# per method: (global parameter -> mergekit default), (per-model parameter -> mergekit default)
MERGEKIT_PARAMS = {
    "linear": ({"normalize": True}, {"weight": None}),
    "task_arithmetic": ({"normalize": False, "lambda": 1.0}, {"weight": None}),
    "ties": ({"normalize": True, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "dare_linear": ({"normalize": False, "rescale": True, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "dare_ties": ({"normalize": False, "rescale": True, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "slerp": ({"t": None}, {}),
    "model_stock": ({"filter_wise": False}, {}),
    "nearswap": ({"t": None}, {}),
}


@dataclass
class MergeCall:
    """One ``nbmerge.merge`` call: ``models`` maps a label to a model reference (a path or a variable name)."""

    method: str
    models: dict[str, Any]
    base: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # out, out_dtype, device, shard_size, overwrite
    layer_range: tuple[int, int] | None = None  # mergekit slices: every model's layers [start, end)
    source: str = "nbmerge"  # or "mergekit"


def parse_recipe(text: str) -> MergeCall:
    """Read a YAML (or JSON) recipe in mergekit's or nbmerge's format."""
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"recipe: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(config, Mapping):
        raise RecipeError("recipe: expected a mapping with 'merge_method' (mergekit) or 'method' (nbmerge) at the top")
    if "merge_method" in config:
        return from_mergekit(config)
    if "method" in config:
        return from_nbmerge(config)
    raise RecipeError("recipe: say which method to use: 'merge_method: ties' (mergekit format) or 'method: ties'")


def from_nbmerge(config: Mapping) -> MergeCall:
    _reject_unknown_keys(config, NBMERGE_KEYS, "recipe")
    models = config.get("models")
    if isinstance(models, Mapping) and models:
        labelled = {str(label): ref for label, ref in models.items()}
    elif isinstance(models, list) and models:
        labelled = {_reference(ref, f"models[{i}]"): ref for i, ref in enumerate(models)}
    else:
        raise RecipeError("recipe: 'models' must be a list of models or a {name: model} mapping")
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"recipe: 'params' must be a mapping of parameter names to values, got {params!r}")
    options = {key: config[key] for key in RUN_OPTIONS if key in config}
    return MergeCall(str(config["method"]), labelled, config.get("base"), dict(params), options)


def from_mergekit(config: Mapping) -> MergeCall:
    for key, reason in MERGEKIT_UNSUPPORTED.items():
        if key in config:
            raise RecipeError(f"recipe: mergekit's {key!r} is not supported ({reason}); remove it")
    _reject_unknown_keys(config, MERGEKIT_KEYS, "recipe (mergekit format)")
    name = config["merge_method"]
    if name not in MERGEKIT_METHODS:
        raise RecipeError(f"recipe: mergekit merge_method {name!r} is not supported; nbmerge maps "
                          f"{', '.join(MERGEKIT_METHODS)} (or write 'method:' with any nbmerge method)")
    entries, layer_range = _mergekit_models(config)
    base = config.get("base_model")
    global_defaults, model_defaults = MERGEKIT_PARAMS[name]
    given = dict(config.get("parameters") or {})
    for key in MERGEKIT_NO_EFFECT:
        given.pop(key, None)
    # mergekit lets a top-level parameter give the default of a per-model one
    model_level = {key: given.pop(key) for key in list(given) if key in model_defaults}
    _reject_unknown_keys(given, tuple(global_defaults), f"recipe: {name} parameters")
    settings = {**global_defaults, **given}
    models: dict[str, Any] = {}
    per_model: dict[str, list] = {key: [] for key in model_defaults}
    for entry in entries:
        reference = entry["model"]
        own = dict(entry.get("parameters") or {})
        for key in MERGEKIT_NO_EFFECT:
            own.pop(key, None)
        _reject_unknown_keys(own, tuple(model_defaults), f"recipe: {name} parameters of model {reference!r}")
        if reference == base and name in ("ties", "task_arithmetic", "dare_ties", "dare_linear", "model_stock",
                                          "nearswap"):
            continue  # mergekit skips the base when it is listed among the models: its task vector is 0
        models[_reference(reference, "model")] = reference
        for key, default in model_defaults.items():
            value = own.get(key, model_level.get(key, default))
            if isinstance(value, (list, Mapping)):
                raise RecipeError(f"recipe: per-layer or filtered values of {key!r} (model {reference!r}) are not "
                                  f"supported; give one number")
            per_model[key].append(value)
    if name == "slerp":
        return _mergekit_slerp(models, base, settings, config, layer_range)
    if name in ("model_stock", "nearswap"):
        if base is None:
            raise RecipeError(f"recipe: mergekit {name} needs base_model")
        params = {"filter_wise": bool(settings["filter_wise"])} if name == "model_stock" else {"t": settings["t"]}
        return MergeCall(name, models, base, params, _mergekit_options(config), layer_range, "mergekit")
    params = _mergekit_task_vector_params(name, settings, per_model, len(models))
    if name == "linear":
        base = None  # mergekit's linear averages the listed models; base_model only names the config source
    return MergeCall(_NBMERGE_METHOD[name], models, base, params, _mergekit_options(config), layer_range, "mergekit")


_NBMERGE_METHOD = {"linear": "weighted_average", "task_arithmetic": "task_arithmetic", "ties": "ties",
                   "dare_linear": "dare", "dare_ties": "dare"}


def _mergekit_task_vector_params(name: str, settings: dict, per_model: dict, n_models: int) -> dict:
    weights = per_model["weight"]
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise RecipeError(f"recipe: give every model a weight or none (mergekit {name})")
    weights = None if not weights or weights[0] is None else [float(w) for w in weights]
    if name == "linear":
        return {"weights": weights, "normalize": bool(settings["normalize"])}
    if settings["normalize"] and name in ("task_arithmetic", "dare_linear"):
        # mergekit divides the weighted sum of task vectors by Σ weight
        raw = weights or [1.0] * n_models
        total = sum(raw)
        weights = [w / total for w in raw] if abs(total) >= 1e-8 else raw
    params = {"scaling": float(settings["lambda"]), "weights": weights}
    if name == "task_arithmetic":
        return params
    if name == "ties":  # a density per model, as mergekit allows
        densities = [1.0 if d is None else float(d) for d in per_model["density"]] or [1.0]
        density = densities[0] if len(set(densities)) == 1 else densities
        return {**params, "density": density, "trim_scope": "tensor", "sign": "sum",
                "merge_func": "mean" if settings["normalize"] else "sum"}
    if name == "dare_ties" and settings["normalize"]:
        raise RecipeError("recipe: dare_ties with normalize: true is not supported (nbmerge's DARE-TIES sums the "
                          "agreeing task vectors, as mergekit's default does); remove normalize")
    density = _one_density(name, per_model["density"])
    return {**params, "drop_rate": 1.0 - density, "rescale": "l1" if settings["rescale"] else False,
            "combine": "ties" if name == "dare_ties" else "linear"}


def _one_density(name: str, densities: list) -> float:
    if len(set(densities)) > 1:
        raise RecipeError(f"recipe: {name} with a different density per model is not supported; give every model "
                          f"the same density (got {', '.join(str(d) for d in densities)})")
    return float(densities[0]) if densities else 1.0


def _mergekit_slerp(models: dict, base, settings: dict, config: Mapping, layer_range) -> MergeCall:
    if base is None:
        raise RecipeError("recipe: mergekit slerp needs base_model (the t = 0 endpoint)")
    others = {label: ref for label, ref in models.items() if ref != base}
    if len(others) != 1 or len(models) != 2:
        raise RecipeError(f"recipe: slerp interpolates two models: list base_model and one other model "
                          f"(got {', '.join(map(str, models)) or 'none'})")
    if settings["t"] is None:
        raise RecipeError("recipe: slerp needs parameters: {t: ...}")
    return MergeCall("slerp", others, base, {"t": settings["t"]}, _mergekit_options(config), layer_range, "mergekit")


def _mergekit_models(config: Mapping) -> tuple[list[dict], tuple[int, int] | None]:
    if "slices" in config and "models" in config:
        raise RecipeError("recipe: give either 'models' or 'slices', not both")
    if "slices" not in config:
        return [_model_entry(entry) for entry in _as_list(config.get("models"), "models")], None
    slices = _as_list(config["slices"], "slices")
    if len(slices) != 1:
        raise RecipeError(f"recipe: {len(slices)} slices stitch layers of several merges (a frankenmerge), which "
                          f"nbmerge does not do; use one slice covering every layer")
    sources = _as_list(slices[0].get("sources") if isinstance(slices[0], Mapping) else None, "slices[0].sources")
    entries = [_model_entry(source) for source in sources]
    ranges = {tuple(source.get("layer_range") or ()) for source in sources}
    if len(ranges) != 1 or len(next(iter(ranges))) != 2:
        raise RecipeError("recipe: every source of the slice needs the same layer_range [start, end]; different "
                          "ranges per model are not supported")
    start, end = next(iter(ranges))
    return entries, (int(start), int(end))


def _model_entry(entry) -> dict:
    if isinstance(entry, str):
        return {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise RecipeError(f"recipe: each model entry needs 'model: <path or variable>', got {entry!r}")
    _reject_unknown_keys(entry, ("model", "parameters", "layer_range"), "recipe: model entry")
    if not isinstance(entry["model"], str):
        raise RecipeError(f"recipe: 'model' must be a path or a variable name, got {entry['model']!r}")
    return dict(entry)


def _mergekit_options(config: Mapping) -> dict:
    dtype = config.get("out_dtype") or config.get("dtype")
    return {"out_dtype": dtype} if dtype else {}


def _as_list(value, what: str) -> list:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"recipe: '{what}' must be a non-empty list")
    return value


def _reference(reference, what: str) -> str:
    if not isinstance(reference, str):
        raise RecipeError(f"recipe: {what} must be a path or a variable name, got {reference!r}")
    return reference


def _reject_unknown_keys(config: Mapping, valid: tuple, where: str) -> None:
    for key in config:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}: unknown key {key!r}{hint} (valid: {', '.join(valid)})")


def check_layer_range(call: MergeCall, layer_counts: Callable[[], dict[str, int]]) -> None:
    """A mergekit slice maps onto one merge only when it covers every layer: [0, L) of each model."""
    if call.layer_range is None:
        return
    start, end = call.layer_range
    for label, layers in layer_counts().items():
        if (start, end) != (0, layers):
            raise RecipeError(f"recipe: layer_range [{start}, {end}] covers only part of {label}'s {layers} layers; "
                              f"merging a layer range (passthrough / frankenmerge) is not supported: use "
                              f"[0, {layers}] or drop slices")
