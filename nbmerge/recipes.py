"""Merge recipes in YAML: mergekit's configuration format and nbmerge's own, both turned into one ``merge`` call.

nbmerge's spelling is the API's keywords (and the ``nbmerge_recipe.json`` every merge writes)::

    method: ties
    models: [ft-math/, ft-code/]          # or {name: model}
    base: base/
    params: {density: 0.3, trim_scope: tensor}
    out_dtype: bfloat16                   # also: device, shard_size, allow_nonfinite, allow_config_mismatch

Where the merge is written and whether an existing output may be replaced are the caller's choices (``--out``,
``--overwrite``, ``run_recipe(out=..., overwrite=...)``), never a recipe's: a recipe comes from someone else, and
``out: ../somewhere`` with ``overwrite: true`` would replace that folder. A recipe holding ``out`` or
``overwrite`` is refused with a RecipeError that says so (mergekit's recipes have neither key either).

mergekit's (``merge_method``, ``models`` or ``slices`` with per-model ``parameters``, ``base_model``,
``parameters``, ``dtype``, ``tokenizer_source``) maps onto nbmerge methods with mergekit's defaults and semantics.
Any number may be a gradient (anchors over depth) or a filter list, per model or for all; mergekit's first
matching filter wins. Several slices (or one slice over part of the layers) make a layer stack
(``nbmerge.stack``), each slice merged with the recipe's method over its own sources. Several YAML documents
are mergekit-multi's chain: named merges that later ones use as models (``nbmerge.recipe_chain``).

================ ===================================================================================
linear           weighted_average: weights = per-model weight, normalize (default true); a base_model
                 is averaged too, with the top-level (default) weight, as mergekit does
task_arithmetic  task_arithmetic: weights = weight, normalize (÷ Σ weight), scaling = lambda
ties             ties with trim_scope=tensor, sign=sum: density (per model, default 1), weights,
                 merge_func = mean when normalize (default true) else sum, scaling = lambda
dare_linear      dare with combine=linear: drop_rate = 1 − density (per model), rescale true → "l1"
                 (mergekit's ‖τ‖₁ rescaling), weights, normalize (÷ Σ weight), scaling = lambda
dare_ties        dare with combine=ties (normalize default false, divides by the agreeing weights)
breadcrumbs      breadcrumbs (combine=linear; breadcrumbs_ties: combine=ties): density (default 1),
                 gamma (default 0.01) per model, normalize and rescale (default false), lambda
della            della (combine=ties, normalize and rescale default true; della_linear: combine=linear,
                 normalize false): density (default 1), epsilon (default 0.15) per model, lambda
sce              sce: select_topk (default 1)
slerp            slerp: base_model is the t = 0 endpoint, t a number, anchors or filter list
nuslerp          nuslerp: two models' weights, nuslerp_flatten (default true), nuslerp_row_wise, base optional
multislerp       multislerp: weights, normalize_weights (default true), eps, base optional
karcher          karcher: max_iter (10), tol (1e-5), over the models and the base when given
model_stock      model_stock: base_model, two or more models, filter_wise (default false)
nearswap         nearswap: base_model and one model, t (required)
arcee_fusion     arcee_fusion: base_model and one model (exact quartiles where mergekit samples 10⁶ entries)
ram, ramplus_tl  ram (epsilon), ramplus_tl (r, alpha, epsilon): base_model and the models
passthrough      passthrough: one model per slice, scale (per model, default none)
================ ===================================================================================

``dtype`` and ``out_dtype`` mean what they mean to mergekit 0.1.5: the dtype the arithmetic runs in (absent: each
tensor's inputs' dtype) and the output's (absent: the compute dtype). Where nbmerge has the method's mergekit
arithmetic (``MergeMethod.mergekit_tensor``: linear, task_arithmetic, ties, breadcrumbs, slerp, passthrough) they
become the merge's ``compute_dtype`` and ``out_dtype``, and the result is mergekit's bit for bit; elsewhere nbmerge
computes in float32 and stores in ``out_dtype``, else ``dtype``.
DARE's and DELLA's masks are nbmerge's own seeded draws, so those merges equal mergekit's in distribution, not
bit for bit. tokenizer_source (base, a model, or union) picks the tokenizer the output gets; models whose
vocabularies differ from it have their embedding rows permuted and filled as mergekit does (nbmerge.io.vocabularies;
a layer stack fills each vocabulary tensor within the slice it comes from); ``tokenizer: {source, pad_to_multiple_of}``
is the same, union by default, its rows padded to a multiple (each model's padding rows: the mean of its token rows).
Model references stay strings here; the caller resolves them (paths, or notebook variables in the magics);
mergekit's ``model+adapter`` resolves to the model with that LoRA adapter applied (``nbmerge.io.lora``).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from nbmerge.errors import RecipeError, shown
from nbmerge.io.untrusted import check_depth

RUN_OPTIONS = ("out_dtype", "compute_dtype", "device", "shard_size", "allow_nonfinite", "allow_config_mismatch",
               "tokenizer_source",
               "pad_to_multiple_of", "chat_template")
CALLER_OPTIONS = {"out": "--out DIR (nbmerge merge --recipe, %%merge) or out=... (run_recipe)",
                  "overwrite": "--overwrite (nbmerge merge --recipe, %%merge) or overwrite=True (run_recipe)"}
SLICE_KEYS = ("method", "models", "layers", "base", "base_layers", "params", "nbmerge_version", "plugin")
NBMERGE_KEYS = ("method", "models", "base", "params", *RUN_OPTIONS, "nbmerge_version", "plugin")
MERGEKIT_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template",
                 "name")  # name: mergekit-multi's label for this merge's output
# mergekit options that change what a merge produces and that nbmerge does not do
MERGEKIT_UNSUPPORTED = {
    "modules": "per-module recipes",
}
MAX_RECIPE_CHARS = 10_000_000
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_VALUES = 100_000
# mergekit parameters that only change memory use, not the result
MERGEKIT_NO_EFFECT = ("int8_mask",)


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit merge_method maps onto an nbmerge method.

    shared / per_model: mergekit's parameters with their defaults (None: required or absent);
    params(settings, per_model, n): the nbmerge parameters from the recipe's values (per_model: name -> a list,
    one value per model); base: "used", "required", "input" (mergekit's linear: one more averaged model) or
"ignored" (passthrough);
    skips_listed_base: a base listed among the models is dropped (its task vector is 0).
    """

    method: str
    shared: dict
    per_model: dict
    params: Callable[[dict, dict, int], dict]
    base: str = "used"
    skips_listed_base: bool = True


@dataclass
class MergeCall:
    """One ``nbmerge.merge`` call: ``models`` maps a label to a model reference (a path or a variable name)."""

    method: str
    models: dict[str, Any]
    base: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # RUN_OPTIONS: out_dtype, device, shard_size, ...
    layer_range: tuple[int, int] | None = None  # mergekit's one slice: every model's layers [start, end)
    source: str = "nbmerge"  # or "mergekit"
    slices: list[SliceCall] | None = None  # a layer stack (method "stack"): the slices in order
    # a chain (mergekit-multi): named merges run first, in this order; each name is a model reference in the
    # merges after it (nbmerge.recipe_chain)
    intermediates: list[tuple[str, MergeCall]] = field(default_factory=list)
    text: str | None = None  # the recipe as the user wrote it (the output's model card keeps it verbatim)


@dataclass
class SliceCall:
    """One slice of a layer stack: ``models`` label -> reference, ``layers`` label -> [start, end), a method with
    its parameters, and a base (a reference) with its own layer range."""

    method: str
    models: dict[str, Any]
    layers: dict[str, tuple[int, int]]
    params: dict[str, Any] = field(default_factory=dict)
    base: Any = None
    base_layers: tuple[int, int] | None = None


def parse_recipe(text: str) -> MergeCall:
    """Read a YAML (or JSON) recipe in mergekit's or nbmerge's format."""
    import yaml

    if len(text) > MAX_RECIPE_CHARS:
        raise RecipeError(f"recipe: {len(text)} characters; a recipe is at most {MAX_RECIPE_CHARS}")
    _check_flow_depth(text)
    try:
        documents = list(yaml.load_all(text, Loader=_recipe_loader()))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"recipe: not valid YAML{where}: {shown(getattr(exc, 'problem', None) or exc)}") from None
    except RecursionError:
        raise RecipeError(f"recipe: nested deeper than {MAX_RECIPE_DEPTH} levels") from None
    for document in documents:
        _check_bounded(document)
    if len(documents) > 1:  # mergekit-multi: a chain of named merges
        from nbmerge.recipe_chain import chain_from_documents

        call = chain_from_documents(documents, _parse_one)
    else:
        call = _parse_one(documents[0] if documents else None)
    call.text = text
    return call


def _check_flow_depth(text: str) -> None:
    """Refuse brackets nested deeper than 3 × MAX_RECIPE_DEPTH before PyYAML reads them: its scanner takes time
    quadratic in the nesting (seconds at a thousand levels). Brackets inside quoted text count too, hence the
    margin."""
    depth = 0
    for bracket in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if bracket.group() in "[{" else max(depth - 1, 0)
        if depth > 3 * MAX_RECIPE_DEPTH:
            raise RecipeError(f"recipe: nested deeper than {MAX_RECIPE_DEPTH} levels")


def _check_bounded(document: Any) -> None:
    """A recipe nests at most MAX_RECIPE_DEPTH levels and, its YAML aliases expanded, holds at most
    MAX_RECIPE_VALUES values: the safe loader shares an aliased node instead of copying it, but every later walk
    (a parameter list checked, a recipe written as JSON) would expand it, and 9 aliases of 9 aliases ... are
    9⁹ values."""
    check_depth(document, "recipe", MAX_RECIPE_DEPTH, RecipeError)
    sizes: dict[int, int] = {}

    def expanded(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if id(value) not in sizes:
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            sizes[id(value)] = 1 + sum(expanded(child) for child in children)
            if sizes[id(value)] > MAX_RECIPE_VALUES:
                raise RecipeError(f"recipe: its YAML aliases expand to more than {MAX_RECIPE_VALUES} values; "
                                  f"write the values out")
        return sizes[id(value)]

    expanded(document)


def _parse_one(config: Any) -> MergeCall:
    if not isinstance(config, Mapping):
        raise RecipeError("recipe: expected a mapping with 'merge_method' (mergekit) or 'method' (nbmerge) at the top")
    for key, flag in CALLER_OPTIONS.items():
        if key in config:
            raise RecipeError(f"recipe: {key!r} is not taken from a recipe: where the merge is written and whether it "
                              f"may replace an existing output are the caller's choice; remove it and pass {flag}")
    if "merge_method" in config:
        return from_mergekit(config)
    if "method" in config:
        return from_nbmerge(config)
    if "slices" in config:
        return stack_from_nbmerge(config)
    raise RecipeError("recipe: say which method to use: 'merge_method: ties' (mergekit format) or 'method: ties'")


def _recipe_loader():
    """PyYAML's safe loader (no Python tags; aliases shared, never expanded) that refuses a key given twice in one
    mapping: PyYAML would keep the last silently, and the recipe would not merge what it says."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    mark = key_node.start_mark
                    raise RecipeError(f"recipe: key {shown(key)} appears twice in one mapping (line {mark.line + 1}); "
                                      f"keep one")
                seen.add(key) if isinstance(key, (str, int, float, bool)) else None
            return super().construct_mapping(node, deep)

    return RecipeLoader


def from_nbmerge(config: Mapping) -> MergeCall:
    _reject_unknown_keys(config, NBMERGE_KEYS, "recipe")
    options = {key: config[key] for key in RUN_OPTIONS if key in config}
    return MergeCall(str(config["method"]), _labelled(config.get("models"), "recipe"), config.get("base"),
                     _params(config, "recipe"), options)


def stack_from_nbmerge(config: Mapping) -> MergeCall:
    """nbmerge's layer stack (what ``nbmerge.stack`` records): ``slices`` of {method (default passthrough),
    models, layers: [start, end] or {label: [start, end]}, base, base_layers, params}."""
    _reject_unknown_keys(config, ("slices", *RUN_OPTIONS, "nbmerge_version"), "recipe")
    calls = []
    for i, item in enumerate(_as_list(config["slices"], "slices")):
        where = f"recipe: slices[{i}]"
        if not isinstance(item, Mapping):
            raise RecipeError(f"{where} must be a mapping with 'models' and 'layers', got {shown(item)}")
        _reject_unknown_keys(item, SLICE_KEYS, where)
        models = _labelled(item.get("models"), where)
        layers = item.get("layers")
        if not isinstance(layers, Mapping):
            layers = {label: layers for label in models}
        calls.append(SliceCall(str(item.get("method", "passthrough")), models,
                               {label: _layer_pair(pair, f"{where}: layers of {label}") for label, pair in
                                layers.items()},
                               _params(item, where), item.get("base"),
                               None if item.get("base_layers") is None
                               else _layer_pair(item["base_layers"], f"{where}: base_layers")))
    models = {label: ref for piece in calls for label, ref in piece.models.items()}
    options = {key: config[key] for key in RUN_OPTIONS if key in config}
    return MergeCall("stack", models, None, {}, options, slices=calls)


def _labelled(models: Any, where: str) -> dict[str, Any]:
    if isinstance(models, Mapping) and models:
        return {str(label): ref for label, ref in models.items()}
    if isinstance(models, list) and models:
        return {_reference(ref, f"models[{i}]"): ref for i, ref in enumerate(models)}
    raise RecipeError(f"{where}: 'models' must be a list of models or a {{name: model}} mapping")


def _params(config: Mapping, where: str) -> dict:
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{where}: 'params' must be a mapping of parameter names to values, got {shown(params)}")
    return dict(params)


def _layer_pair(pair: Any, where: str) -> tuple[int, int]:
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair) or not 0 <= pair[0] < pair[1]):
        raise RecipeError(f"{where} must be [start, end] with 0 <= start < end, got {shown(pair)}")
    return int(pair[0]), int(pair[1])


def from_mergekit(config: Mapping) -> MergeCall:
    for key, reason in MERGEKIT_UNSUPPORTED.items():
        if key in config:
            raise RecipeError(f"recipe: mergekit's {shown(key)} is not supported ({reason}); remove it")
    _reject_unknown_keys(config, MERGEKIT_KEYS, "recipe (mergekit format)")
    name = config["merge_method"]
    if not isinstance(name, str) or name not in MERGEKIT:
        raise RecipeError(f"recipe: mergekit merge_method {shown(name)} is not supported; nbmerge maps "
                          f"{', '.join(MERGEKIT)} (or write 'method:' with any nbmerge method)")
    spec = MERGEKIT[name]
    base = config.get("base_model")
    if base is not None:
        _check_lora_reference(_reference(base, "base_model"))
    top = _parameters(config.get("parameters"), "parameters")
    if "slices" in config and "models" in config:
        raise RecipeError("recipe: give either 'models' or 'slices', not both")
    if "slices" not in config:
        entries = [_model_entry(entry) for entry in _as_list(config.get("models"), "models")]
        call = _mergekit_merge(name, spec, entries, base, top, config)[0]
        slices = [(entries, {})]
    else:
        slices = [_slice_entries(item, f"slices[{i}]") for i, item in enumerate(_as_list(config["slices"], "slices"))]
        if len(slices) == 1 and len({tuple(entry["layer_range"]) for entry in slices[0][0]}) == 1:
            entries, own = slices[0]
            call = _mergekit_merge(name, spec, entries, base, {**top, **own}, config)[0]
            call.layer_range = tuple(entries[0]["layer_range"])
        else:
            call = _mergekit_stack(name, spec, slices, base, top, config)
    references = {entry["model"] for entries, _ in slices for entry in entries} | ({base} if base else set())
    call.options = _mergekit_options(config, base, references, _has_mergekit_arithmetic(call))
    return call


def _has_mergekit_arithmetic(call: MergeCall) -> bool:
    """Whether every method of the call has mergekit's arithmetic (``MergeMethod.mergekit_tensor``)."""
    from nbmerge.plugins import get_method

    methods = {piece.method for piece in call.slices} if call.slices is not None else {call.method}
    return all(get_method(method).mergekit_tensor is not None for method in methods)


def _mergekit_merge(name: str, spec: MergekitMethod, entries: list[dict], base, given: dict,
                    config: Mapping) -> tuple[MergeCall, dict[str, tuple[int, int]]]:
    """One mergekit merge (or one slice of a stack) as an nbmerge merge call, and each model's layer range (by
    label); labels are the model references, or reference[start:end] where one slice reads two ranges of one
    model."""
    given = dict(given)
    for key in MERGEKIT_NO_EFFECT:
        given.pop(key, None)
    # mergekit lets a top-level parameter give the default of a per-model one
    model_level = {key: given.pop(key) for key in list(given) if key in spec.per_model}
    _reject_unknown_keys(given, tuple(spec.shared), f"recipe: {name} parameters")
    settings = {key: _checked_renamed(name, spec, key, _setting(given.get(key, default), default,
                                                                f"{name} parameter {shown(key)}"), "")
                for key, default in spec.shared.items()}
    models: dict[str, Any] = {}
    layers: dict[str, tuple[int, int]] = {}
    per_model: dict[str, list] = {key: [] for key in spec.per_model}
    if spec.base == "input" and base is not None and all(entry["model"] != base for entry in entries):
        entries = [*entries, {"model": base}]  # mergekit's linear averages the base too, with the default weight
    references = [entry["model"] for entry in entries]
    for entry in entries:
        reference = _reference(entry["model"], "model")
        own = _parameters(entry.get("parameters"), f"parameters of model {shown(reference)}")
        for key in MERGEKIT_NO_EFFECT:
            own.pop(key, None)
        _reject_unknown_keys(own, tuple(spec.per_model), f"recipe: {name} parameters of model {shown(reference)}")
        if reference == base and spec.skips_listed_base:
            continue  # mergekit skips the base when it is listed among the models: its task vector is 0
        label = reference
        if references.count(reference) > 1 and entry.get("layer_range") is not None:
            label = f"{reference}[{entry['layer_range'][0]}:{entry['layer_range'][1]}]"
        if label in models:
            raise RecipeError(f"recipe: model {shown(reference)} is listed twice with the same layers")
        models[label] = reference
        if entry.get("layer_range") is not None:
            layers[label] = tuple(entry["layer_range"])
        for key, default in spec.per_model.items():
            value = own.get(key, model_level.get(key, default))
            where = f"{name} parameter {shown(key)} of model {shown(reference)}"
            per_model[key].append(_checked_renamed(name, spec, key, _setting(value, default, where),
                                                   f" (model {shown(reference)})"))
    if spec.base == "required" and base is None:
        raise RecipeError(f"recipe: mergekit {name} needs base_model")
    if name == "slerp":
        call = _mergekit_slerp(models, base, settings, config, None)
    else:
        params = spec.params(settings, per_model, len(models))
        if spec.base in ("input", "ignored"):
            base = None  # linear: now one of the averaged models; passthrough: one model as it is
        call = MergeCall(spec.method, models, base, params, {}, None, "mergekit")
    return call, layers


def _mergekit_stack(name: str, spec: MergekitMethod, slices: list[tuple[list[dict], dict]], base, top: dict,
                    config: Mapping) -> MergeCall:
    """Several slices (or one with different ranges per model): a layer stack, each slice merged with the
    recipe's method over its own sources (a passthrough slice: its one source as it is)."""
    calls = []
    for i, (entries, own) in enumerate(slices):
        in_slice = [entry for entry in entries if entry["model"] == base]
        slice_base = base if in_slice or spec.base == "required" else None
        call, layers = _mergekit_merge(name, spec, entries, slice_base, {**top, **own}, config)
        base_layers = tuple(in_slice[0]["layer_range"]) if in_slice and call.base is not None else None
        if call.base is not None and base_layers is None:
            raise RecipeError(f"recipe: slices[{i}]: {name} needs base_model {shown(base)} among the slice's sources "
                              f"(with its layer_range)")
        layers = {label: pair for label, pair in layers.items() if label in call.models}
        calls.append(SliceCall(call.method, call.models, layers, call.params, call.base, base_layers))
    models = {label: ref for piece in calls for label, ref in piece.models.items()}
    if base is not None:
        models.setdefault(base, base)
    return MergeCall("stack", models, None, {}, {}, None, "mergekit", calls)


def _slice_entries(item: Any, where: str) -> tuple[list[dict], dict]:
    """A mergekit slice's sources (each with a layer_range) and its own parameters."""
    if not isinstance(item, Mapping):
        raise RecipeError(f"recipe: {where} must be a mapping with 'sources', got {shown(item)}")
    _reject_unknown_keys(item, ("sources", "parameters"), f"recipe: {where}")
    entries = [_model_entry(source) for source in _as_list(item.get("sources"), f"{where}.sources")]
    for j, entry in enumerate(entries):
        entry["layer_range"] = list(_layer_pair(entry.get("layer_range"), f"{where}.sources[{j}] layer_range"))
    return entries, _parameters(item.get("parameters"), f"{where}.parameters")


def _parameters(value: Any, where: str) -> dict:
    """A mergekit ``parameters`` block: a mapping (absent or empty: none)."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"recipe: {where} must be a mapping of parameter names to values, got {shown(value)}")
    return dict(value)


# mergekit parameters that reach nbmerge under another name or value (weight → weights, lambda → scaling,
# density → drop_rate = 1 − density): checked here, so that an error names what the recipe wrote
RENAMED = ("weight", "lambda", "density")


def _checked_renamed(name: str, spec: MergekitMethod, key: str, value: Any, model: str) -> Any:
    """``value`` (a number, anchors, or filter entries of either) when ``key`` is one of RENAMED: every number
    finite, and a DARE density in (0, 1] (its drop rate 1 − density in [0, 1)); a RecipeError names the method,
    ``key`` and the ``model`` (" (model 'x')", or "" for a top-level value)."""
    if key not in RENAMED or value is None:
        return value
    values = [entry["value"] if isinstance(entry, Mapping) else entry
              for entry in (value if isinstance(value, list) else [value])]
    numbers = [v for item in values for v in (item if isinstance(item, list) else [item])]
    for number in numbers:
        if isinstance(number, str):  # "0.5": read as a number, as mergekit's validation does
            try:
                number = float(number)
            except ValueError:
                pass
        if not _is_number(number) or not math.isfinite(number):
            raise RecipeError(f"recipe: {name}: {key} must be a number (or anchors over depth), got "
                              f"{shown(value)}{model}")
        if key == "density" and spec.method == "dare" and not 0 < number <= 1:
            raise RecipeError(f"recipe: {name}: density must be in (0, 1] (the fraction of each task vector kept), "
                              f"got {shown(number)}{model}")
    return value


def _setting(value: Any, default: Any, where: str) -> Any:
    """A mergekit parameter value in nbmerge's spelling: a number (or true/false), a list of anchors over depth,
    or filter entries [{filter, value}, ...]. mergekit takes the first entry whose filter is in the tensor's name,
    an entry without filter (or with filter "*") matching every tensor: entries after that one never apply, and
    when every entry has a filter the parameter's default applies elsewhere."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not any(isinstance(v, Mapping) for v in value):
        return value
    entries = []
    for entry in value:
        if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise RecipeError(f"recipe: {where}: each entry must be {{filter: ..., value: ...}}, got {shown(entry)}")
        if entry.get("filter") in (None, "*"):
            entries.append({"value": entry["value"]})
            break
        entries.append({"filter": entry["filter"], "value": entry["value"]})
    else:
        if default is None:
            raise RecipeError(f"recipe: {where}: every entry has a filter; add one without filter (the value for "
                              f"the other tensors)")
        entries.append({"value": default})
    return entries


def _flag(value: Any, where: str) -> bool:
    """A mergekit boolean: true/false (or 1/0, which mergekit's validation also accepts)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise RecipeError(f"recipe: {where} must be true or false, got {shown(value)}")


def _one_per_model_value(values: list) -> Any:
    """The per-model values as one number when every model has the same number, else the list (one shared
    gradient stays a list per model: a bare list would read as one value per model)."""
    return values[0] if values and _is_number(values[0]) and all(v == values[0] for v in values) else list(values)


def _weights(per_model: dict, method: str) -> list | None:
    weights = per_model["weight"]
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise RecipeError(f"recipe: give every model a weight or none (mergekit {method}"
                          f"{'; its base_model is averaged too' if method == 'linear' else ''})")
    return None if not weights or weights[0] is None else list(weights)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _linear(settings: dict, per_model: dict, n: int) -> dict:
    return {"weights": _weights(per_model, "linear"), "normalize": _flag(settings["normalize"], "linear normalize")}


def _task_arithmetic(settings: dict, per_model: dict, n: int) -> dict:
    """weights, scaling = lambda and normalize, as task_arithmetic takes them (it divides by Σ w as mergekit)."""
    return {"scaling": settings["lambda"], "weights": _weights(per_model, "task_arithmetic"),
            "normalize": _flag(settings["normalize"], "task_arithmetic normalize")}


def _ties(settings: dict, per_model: dict, n: int) -> dict:
    normalize = _flag(settings["normalize"], "ties normalize")
    return {"scaling": settings["lambda"], "weights": _weights(per_model, "ties"),
            "density": _one_per_model_value(per_model["density"]), "trim_scope": "tensor", "sign": "sum",
            "merge_func": "mean" if normalize else "sum", "rescale": _flag(settings["rescale"], "ties rescale")}


def _dare(combine: str) -> Callable[[dict, dict, int], dict]:
    method = f"dare_{combine}"

    def params(settings: dict, per_model: dict, n: int) -> dict:
        drop_rate = _one_per_model_value([_complement(d, method) for d in per_model["density"]])
        return {"scaling": settings["lambda"], "weights": _weights(per_model, method), "drop_rate": drop_rate,
                "combine": combine, "normalize": _flag(settings["normalize"], f"{method} normalize"),
                "rescale": "l1" if _flag(settings["rescale"], f"{method} rescale") else False}

    return params


def _complement(setting: Any, method: str) -> Any:
    """1 − a mergekit setting (a density as a drop rate): a number, anchors, or filter entries of either."""
    if isinstance(setting, list):
        return [{**entry, "value": _complement(entry["value"], method)} if isinstance(entry, Mapping)
                else _complement(entry, method) for entry in setting]
    try:
        return 1.0 - float(setting)
    except (TypeError, ValueError):
        raise RecipeError(f"recipe: {method}: density must be a number, got {shown(setting)}") from None


def _sparsified(method: str, combine: str, sparsity: tuple[str, ...]) -> Callable[[dict, dict, int], dict]:
    """breadcrumbs and della: per-model sparsification parameters, then a linear or TIES combination."""
    def params(settings: dict, per_model: dict, n: int) -> dict:
        return {"combine": combine, "normalize": _flag(settings["normalize"], f"{method} normalize"),
                "rescale": _flag(settings["rescale"], f"{method} rescale"), "scaling": settings["lambda"],
                "weights": _weights(per_model, method),
                **{key: _one_per_model_value(per_model[key]) for key in ("density", *sparsity)}}

    return params


def _spherical(flags: dict) -> Callable[[dict, dict, int], dict]:
    """nuslerp and multislerp: per-model weights and their own options (mergekit name -> nbmerge name)."""
    def params(settings: dict, per_model: dict, n: int) -> dict:
        converted = {ours: _flag(settings[theirs], theirs) if isinstance(spec_default, bool) else settings[theirs]
                     for theirs, (ours, spec_default) in flags.items()}
        return {"weights": _weights(per_model, "spherical"), **converted}

    return params


SPARSE_SHARED = {"normalize": False, "rescale": False, "lambda": 1.0}
MERGEKIT = {
    "linear": MergekitMethod("weighted_average", {"normalize": True}, {"weight": None}, _linear, base="input",
                             skips_listed_base=False),
    "task_arithmetic": MergekitMethod("task_arithmetic", {"normalize": False, "lambda": 1.0}, {"weight": None},
                                      _task_arithmetic, base="required"),
    "ties": MergekitMethod("ties", {"normalize": True, "lambda": 1.0, "rescale": False},
                           {"weight": None, "density": 1.0}, _ties,
                           base="required"),
    "dare_linear": MergekitMethod("dare", {"normalize": False, "rescale": True, "lambda": 1.0},
                                  {"weight": None, "density": 1.0}, _dare("linear"), base="required"),
    "dare_ties": MergekitMethod("dare", {"normalize": False, "rescale": True, "lambda": 1.0},
                                {"weight": None, "density": 1.0}, _dare("ties"), base="required"),
    "breadcrumbs": MergekitMethod("breadcrumbs", SPARSE_SHARED, {"weight": None, "density": 1.0, "gamma": 0.01},
                                  _sparsified("breadcrumbs", "linear", ("gamma",)), base="required"),
    "breadcrumbs_ties": MergekitMethod("breadcrumbs", SPARSE_SHARED,
                                       {"weight": None, "density": 1.0, "gamma": 0.01},
                                       _sparsified("breadcrumbs_ties", "ties", ("gamma",)), base="required"),
    "della": MergekitMethod("della", {**SPARSE_SHARED, "normalize": True, "rescale": True},
                            {"weight": None, "density": 1.0, "epsilon": 0.15},
                            _sparsified("della", "ties", ("epsilon",)), base="required"),
    "della_linear": MergekitMethod("della", {**SPARSE_SHARED, "rescale": True},
                                   {"weight": None, "density": 1.0, "epsilon": 0.15},
                                   _sparsified("della_linear", "linear", ("epsilon",)), base="required"),
    "sce": MergekitMethod("sce", {"select_topk": 1.0}, {},
                          lambda settings, per_model, n: {"select_topk": settings["select_topk"]}, base="required"),
    "slerp": MergekitMethod("slerp", {"t": None}, {}, lambda settings, per_model, n: {}, base="required",
                            skips_listed_base=False),
    "nuslerp": MergekitMethod("nuslerp", {"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": None},
                              _spherical({"nuslerp_row_wise": ("row_wise", False),
                                          "nuslerp_flatten": ("flatten", True)})),
    "multislerp": MergekitMethod("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": None},
                                 _spherical({"normalize_weights": ("normalize_weights", True),
                                             "eps": ("eps", 1e-8)})),
    "karcher": MergekitMethod("karcher", {"max_iter": 10, "tol": 1e-5}, {},
                              lambda settings, per_model, n: {"max_iter": settings["max_iter"],
                                                              "tol": settings["tol"]}),
    "passthrough": MergekitMethod("passthrough", {}, {"scale": None},
                                  lambda settings, per_model, n: {"scale": 1.0 if per_model["scale"][0] is None
                                                                  else per_model["scale"][0]},
                                  base="ignored", skips_listed_base=False),
    "model_stock": MergekitMethod("model_stock", {"filter_wise": False}, {},
                                  lambda settings, per_model, n: {"filter_wise": _flag(settings["filter_wise"],
                                                                                       "filter_wise")},
                                  base="required"),
    "nearswap": MergekitMethod("nearswap", {"t": None}, {},
                               lambda settings, per_model, n: {"t": settings["t"]}, base="required"),
    "arcee_fusion": MergekitMethod("arcee_fusion", {}, {}, lambda settings, per_model, n: {}, base="required"),
    "ram": MergekitMethod("ram", {"epsilon": 1e-5}, {}, lambda settings, per_model, n: dict(settings),
                          base="required"),
    "ramplus_tl": MergekitMethod("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {},
                                 lambda settings, per_model, n: dict(settings), base="required"),
}


def _mergekit_slerp(models: dict, base, settings: dict, config: Mapping, layer_range) -> MergeCall:
    if base is None:
        raise RecipeError("recipe: mergekit slerp needs base_model (the t = 0 endpoint)")
    others = {label: ref for label, ref in models.items() if ref != base}
    if len(others) != 1 or len(models) != 2:
        raise RecipeError(f"recipe: slerp interpolates two models: list base_model and one other model "
                          f"(got {', '.join(map(str, models)) or 'none'})")
    if settings["t"] is None:
        raise RecipeError("recipe: slerp needs parameters: {t: ...}")
    return MergeCall("slerp", others, base, {"t": settings["t"]}, {}, layer_range, "mergekit")


def _model_entry(entry) -> dict:
    if isinstance(entry, str):
        return {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise RecipeError(f"recipe: each model entry needs 'model: <path or variable>', got {shown(entry)}")
    _reject_unknown_keys(entry, ("model", "parameters", "layer_range"), "recipe: model entry")
    if not isinstance(entry["model"], str):
        raise RecipeError(f"recipe: 'model' must be a path or a variable name, got {shown(entry['model'])}")
    _check_lora_reference(entry["model"])
    return dict(entry)


def _check_lora_reference(reference: str) -> None:
    """A model reference may be mergekit's ``model+adapter`` (one PEFT LoRA adapter applied, nbmerge.io.lora)."""
    if "+" in reference and lora_parts(reference) is None:
        raise RecipeError(f"recipe: model {shown(reference)}: mergekit's model+adapter takes one model and one LoRA "
                          f"adapter, both named")


def lora_parts(reference: Any) -> tuple[str, str] | None:
    """``model+adapter`` → (model, adapter), as mergekit splits a reference; None for a plain reference."""
    if not isinstance(reference, str) or "+" not in reference:
        return None
    chunks = reference.split("+")
    return (chunks[0], chunks[1]) if len(chunks) == 2 and all(chunks) else None


def _mergekit_options(config: Mapping, base, references: set, exact: bool) -> dict:
    """The run options of a mergekit recipe. mergekit 0.1.5 computes in ``dtype`` (absent: each tensor's inputs'
    dtype) and stores in ``out_dtype`` (absent: the dtype computed in): where nbmerge has the method's mergekit
    arithmetic (``exact``) they are compute_dtype and out_dtype; elsewhere nbmerge computes in float32 and stores
    in out_dtype, else dtype."""
    options = {}
    if exact:
        options["compute_dtype"] = config.get("dtype") or "inputs"
        if config.get("out_dtype"):
            options["out_dtype"] = config["out_dtype"]
    elif config.get("out_dtype") or config.get("dtype"):
        options["out_dtype"] = config.get("out_dtype") or config.get("dtype")
    source = config.get("tokenizer_source")
    tokenizer = config.get("tokenizer")
    if tokenizer is not None:  # mergekit's newer spelling: tokenizer: {source: ..., pad_to_multiple_of: ...}
        if source is not None:
            raise RecipeError("recipe: give tokenizer_source or tokenizer: {source: ...}, not both")
        if not isinstance(tokenizer, Mapping):
            raise RecipeError(f"recipe: tokenizer must be a mapping such as {{source: base}}, got {shown(tokenizer)}")
        for key in tokenizer:
            if key not in ("source", "pad_to_multiple_of"):
                raise RecipeError(f"recipe: tokenizer.{key} is not supported (nbmerge takes a source and "
                                  f"pad_to_multiple_of, and does not add or force token embeddings); remove it")
        source = tokenizer.get("source", "union")  # mergekit's default
        pad = tokenizer.get("pad_to_multiple_of")
        if pad is not None:
            if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
                raise RecipeError(f"recipe: tokenizer.pad_to_multiple_of must be a positive integer, got {shown(pad)}")
            options["pad_to_multiple_of"] = pad
    if source is not None:
        options["tokenizer_source"] = _tokenizer_source(source, base, references)
    if config.get("chat_template") is not None:
        options["chat_template"] = _chat_template(config["chat_template"])
    return options


def _chat_template(value: Any) -> str:
    """A chat_template the output can get: 'auto', a built-in name, or Jinja text (mergekit's rule: a ``{`` and at
    least 20 characters)."""
    from nbmerge.io.chat_templates import BUILT_IN

    if not isinstance(value, str):
        raise RecipeError(f"recipe: chat_template must be a template name, 'auto' or Jinja text, got {shown(value)}")
    if value != "auto" and value not in BUILT_IN and (len(value) < 20 or "{" not in value):
        raise RecipeError(f"recipe: chat_template {shown(value)} is not one of nbmerge's built-in templates "
                          f"({', '.join(BUILT_IN)}); give 'auto' or the template's Jinja text")
    return value


def _tokenizer_source(source, base, references: set):
    """mergekit's tokenizer_source: "base", "union", or a model (also spelt "model:<ref>")."""
    if not isinstance(source, str):
        raise RecipeError(f"recipe: tokenizer_source must be 'base', 'union' or a model, got {shown(source)}")
    if source == "base":
        if base is None:
            raise RecipeError("recipe: tokenizer_source: base needs base_model")
        return base
    if source == "union":
        return "union"
    reference = source.removeprefix("model:")
    if "+" in reference:
        raise RecipeError(f"recipe: tokenizer_source {shown(reference)} names a model with a LoRA adapter; name the "
                          f"model whose tokenizer to take")
    return reference


def _as_list(value, what: str) -> list:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"recipe: '{what}' must be a non-empty list")
    return value


def _reference(reference, what: str) -> str:
    if not isinstance(reference, str):
        raise RecipeError(f"recipe: {what} must be a path or a variable name, got {shown(reference)}")
    return reference


def _reject_unknown_keys(config: Mapping, valid: tuple, where: str) -> None:
    for key in config:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {shown(close[0])}?" if close else ""
            listing = f"valid: {', '.join(valid)}" if valid else "it takes none"
            raise RecipeError(f"{where}: unknown key {shown(key)}{hint} ({listing})")


def run_recipe(call: MergeCall, resolve: Callable[[Any], Any] = lambda reference: reference, **options: Any):
    """Run a parsed recipe and return its MergeResult: one ``nbmerge.merge``, or an ``nbmerge.stack`` for several
    slices or one slice over part of the models' layers, or a chain's merges in order (``intermediate_dir``: keep
    its intermediate merges there; nbmerge.recipe_chain). ``resolve`` turns a model reference into a model (the
    magics: a notebook variable or a path); ``options`` (out, device, progress, on_progress, ...) override the
    recipe's own, None leaving them as they are."""
    from nbmerge.api import merge
    from nbmerge.layer_stack import LayerSlice, stack
    from nbmerge.model_card import GivenRecipe

    if call.intermediates:
        from nbmerge.recipe_chain import run_chain

        return run_chain(call, resolve, run_recipe, options)
    if call.source == "mergekit":
        resolve = _with_adapters(resolve)
    options = {key: value for key, value in options.items() if key != "intermediate_dir"}
    options = {**call.options, **{key: value for key, value in options.items() if value is not None}}
    source = options.get("tokenizer_source")
    if source is not None and source != "union":
        options["tokenizer_source"] = resolve(source)
    if call.text is not None:
        options["given_recipe"] = GivenRecipe(call.text, call.source)
    slices = call.slices
    if slices is None:
        models = {label: resolve(reference) for label, reference in call.models.items()}
        base = None if call.base is None else resolve(call.base)
        if call.layer_range is None or _covers_every_layer(call.layer_range, models, base):
            return merge(call.method, models, base=base, **options, **call.params)
        slices = [SliceCall(call.method, call.models, {label: call.layer_range for label in call.models},
                            call.params, call.base, call.layer_range if call.base is not None else None)]
    return stack([LayerSlice({label: resolve(reference) for label, reference in piece.models.items()},
                             piece.layers, piece.method, None if piece.base is None else resolve(piece.base),
                             piece.base_layers, piece.params) for piece in slices], **options)


def models_to_resolve(call: MergeCall) -> list[str]:
    """Every model reference ``run_recipe`` will resolve for ``call``, in sorted order: those of its merges (a
    chain's too) but not a chain's own merge names or "union", and both parts of mergekit's ``model+adapter``."""
    from nbmerge.recipe_chain import references

    chained = {name for name, _ in call.intermediates}
    found: set[str] = set()
    for step in [call, *(step for _, step in call.intermediates)]:
        for reference in references(step) - chained - {"union"}:
            parts = lora_parts(reference) if step.source == "mergekit" else None
            found.update(parts or (reference,))
    return sorted(found)


def _with_adapters(resolve: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``resolve`` that turns mergekit's ``model+adapter`` into the model with its LoRA adapter applied."""
    from nbmerge.io.lora import WithLora

    def resolved(reference):
        parts = lora_parts(reference)
        return resolve(reference) if parts is None else WithLora(resolve(parts[0]), resolve(parts[1]))

    return resolved


def _covers_every_layer(layer_range: tuple[int, int], models: dict, base) -> bool:
    """Whether [start, end) is every layer of every model (the one slice is then a plain merge)."""
    from nbmerge.io.sources import open_model
    from nbmerge.method.tensor_names import count_layers

    for label, model in [*models.items(), *([("base", base)] if base is not None else [])]:
        source = open_model(model, label)
        try:
            if tuple(layer_range) != (0, count_layers(source.infos)):
                return False
        finally:
            source.close()
    return True
