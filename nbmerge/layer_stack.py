"""Layer stacking: a model built from slices of layers of several models (mergekit's ``slices``, "frankenmerges").

Slice i takes layers [start, end) of each of its models and merges them with its method (``passthrough``, the
default, passes one model's layers through); its layers become output layers o_i .. o_i + (end − start) − 1,
o_i = the layers of the slices before it. The embeddings come from the first slice and the tensors after the
layer stack (final norm, head) from the last, merged there over that slice's models as mergekit does. Gradients
over depth run over each slice's own layers. Every slice is checked and planned before any tensor is read; the
slices then stream one after another into one output, written atomically with config.json's layer count set.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nbmerge.engine.plan import make_plan
from nbmerge.engine.progress import ProgressEvent
from nbmerge.engine.run import (
    MergePart,
    Output,
    check_chat_template_output,
    resolve_compute_dtype,
    check_output_apart,
    resolve_device,
    resolve_dtype,
    run_parts,
)
from nbmerge.engine.sinks import parse_size
from nbmerge.errors import ModelInputError, ParameterError, shown
from nbmerge.io.chat_templates import choose_chat_template
from nbmerge.io.layer_window import LayerWindow
from nbmerge.io.model_configs import check_configs_agree
from nbmerge.io.sources import ModelSource, open_model
from nbmerge.io.tokenizers import tokenizer_target
from nbmerge.io.untrusted import model_json
from nbmerge.io.vocabularies import check_padding, plan_vocabulary
from nbmerge.model_card import CardSource, GivenRecipe, method_line
from nbmerge.method.tensor_names import is_embedding, layer_index, with_layer
from nbmerge.plugins import get_method
from nbmerge.results import MergeResult, labelled_models, model_label, recipe_header
from nbmerge.version import __version__

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class LayerSlice:
    """Layers [start, end) of each model merged with ``method``: ``layers`` is one (start, end) for every model or
    {label: (start, end)}; a base (for methods that use one) takes ``base_layers`` (default: the one range)."""

    models: Sequence[Any] | Mapping[str, Any]
    layers: tuple[int, int] | Mapping[str, tuple[int, int]]
    method: str = "passthrough"
    base: Any = None
    base_layers: tuple[int, int] | None = None
    params: dict = field(default_factory=dict)


def stack(slices: Sequence[LayerSlice], out: str | Path | None = None, *, device: str = "auto",
          out_dtype: str | None = None, shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True,
          allow_nonfinite: bool = False, on_progress: Callable[[ProgressEvent], None] | None = None,
          cancel: threading.Event | None = None, tokenizer_source: Any = None, pad_to_multiple_of: int | None = None,
          chat_template: str | None = None, compute_dtype: str | None = None,
          given_recipe: GivenRecipe | None = None, allow_config_mismatch: bool = False) -> MergeResult:
    """Stack the slices' layers into one model; ``out``, ``tokenizer_source``, ``pad_to_multiple_of``,
    ``chat_template``, ``compute_dtype``, ``given_recipe`` and ``allow_config_mismatch`` as in ``nbmerge.merge``
    (None: in memory); models of different depths are stacked (num_hidden_layers is not compared)."""
    if not slices or not all(isinstance(s, LayerSlice) for s in slices):
        raise ParameterError("stack: give a non-empty list of nbmerge.LayerSlice")
    target_device, dtype = resolve_device(device), resolve_dtype(out_dtype)
    out_path = None if out is None else Path(out).expanduser()
    check_chat_template_output(chat_template, out_path)
    check_padding(pad_to_multiple_of, tokenizer_source)
    opened: dict[Any, ModelSource] = {}
    vocabulary = None
    try:
        members = []  # per slice, the keys of its models' sources (its base's last)
        for piece in slices:
            inputs = [*labelled_models(piece.models),
                      *([(model_label(piece.base, "base"), piece.base)] if piece.base is not None else [])]
            members.append([_open(model, label, opened) for label, model in inputs])
        sources = list(opened.values())
        if out_path is not None:
            check_output_apart(out_path, sources)
        if not allow_config_mismatch:
            check_configs_agree(sources, ignore=("num_hidden_layers", *(("vocab_size",) if tokenizer_source
                                                                       is not None else ())))
        per_slice = [opened] * len(slices)
        if tokenizer_source is not None:  # vocabularies that differ: rows permuted, filled within each slice
            index = {key: i for i, key in enumerate(opened)}
            groups = [([index[key] for key in keys], index[keys[-1]] if piece.base is not None else None)
                      for keys, piece in zip(members, slices)]
            vocabulary = plan_vocabulary(tokenizer_target(tokenizer_source, sources, [(s.label, s) for s in sources],
                                                          None)[0],
                                         tokenizer_source == "union", sources, None, groups, pad_to_multiple_of)
            per_slice = [dict(zip(keys, aligned)) for keys, aligned in zip(members, vocabulary.groups)]
        parts, recorded, offset = [], [], 0
        for i, layer_slice in enumerate(slices):
            part, record, length = _plan_slice(layer_slice, i, len(slices), offset, per_slice[i], dtype,
                                               compute_dtype)
            parts.append(part)
            recorded.append(record)
            offset += length
        first = parts[0]
        config_folder = (first.base or first.models[0]).folder
        recipe = {"nbmerge_version": __version__, "slices": recorded,
                  **({"out_dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}),
                  **({"compute_dtype": str(compute_dtype).removeprefix("torch.")} if compute_dtype is not None
                     else {})}
        edits = {**_config_edits(config_folder, parts, offset), **(vocabulary.config_edits if vocabulary else {})}
        output = Output(out_path, recipe, parse_size(shard_size), overwrite, config_folder,
                        None if vocabulary is None else vocabulary.tokenizer_folder, edits,
                        choose_chat_template(chat_template, [source.folder for source in sources]),
                        CardSource(tuple(dict.fromkeys(method_line(part.method) for part in parts)), given_recipe))
        return run_parts(parts, output, target_device, progress, on_progress, cancel, allow_nonfinite)
    finally:
        for source in opened.values():
            source.close()
        if vocabulary is not None:
            vocabulary.close()


def _plan_slice(layer_slice: LayerSlice, index: int, count: int, offset: int, opened: dict,
                dtype, compute_dtype=None) -> tuple[MergePart, dict, int]:
    where = f"stack: slice {index}"
    method = get_method(layer_slice.method)
    if method.build_module is not None:
        raise ParameterError(f"{where}: {method.name} builds a module from whole models; a slice needs a method "
                             f"that merges tensor by tensor")
    labelled = labelled_models(layer_slice.models)
    ranges = _ranges(layer_slice, [label for label, _ in labelled], where)
    checked = method.validate(layer_slice.params, len(labelled), layer_slice.base is not None)
    compute = resolve_compute_dtype(compute_dtype, method, checked)

    def keeps_outside(name: str) -> bool:  # embeddings from the first slice, final norm and head from the last
        return (index == 0 and is_embedding(name)) or (index == count - 1 and not is_embedding(name))

    windows = [LayerWindow(opened[_open(model, label, opened)], *ranges[label], keeps_outside)
               for label, model in labelled]
    base_window, base_range = None, None
    if layer_slice.base is not None:
        base_range = layer_slice.base_layers or (next(iter(set(ranges.values()))) if len(set(ranges.values())) == 1
                                                 else None)
        if base_range is None:
            raise ParameterError(f"{where}: give base_layers (the models' layer ranges differ)")
        base_window = LayerWindow(opened[_open(layer_slice.base, model_label(layer_slice.base, "base"), opened)],
                                  *base_range, keeps_outside)
    lengths = {end - start for start, end in [*ranges.values(), *([base_range] if base_range else [])]}
    if len(lengths) != 1:
        raise ModelInputError(f"{where}: its layer ranges span different numbers of layers "
                              f"({', '.join(f'{label} {list(r)}' for label, r in ranges.items())})")
    plan = make_plan(method, checked, windows, base_window, dtype, compute)

    def renumbered(name: str) -> str:
        layer = layer_index(name)
        return name if layer is None else with_layer(name, layer + offset)

    record = recipe_header(method, checked, [label for label, _ in labelled],
                           None if base_window is None else base_window.label,
                           layers={label: list(r) for label, r in ranges.items()},
                           **({"base_layers": list(base_range)} if base_range else {}))
    return MergePart(method, checked, plan, windows, base_window, renumbered), record, lengths.pop()


def _ranges(layer_slice: LayerSlice, labels: list[str], where: str) -> dict[str, tuple[int, int]]:
    layers = layer_slice.layers
    if isinstance(layers, Mapping):
        missing = [label for label in labels if label not in layers]
        if missing:
            raise ParameterError(f"{where}: no layer range for {', '.join(missing)}")
        given = {label: layers[label] for label in labels}
    else:
        given = {label: layers for label in labels}
    checked = {}
    for label, pair in given.items():
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ParameterError(f"{where}: the layer range of {label} must be [start, end], got {shown(pair)}")
        checked[label] = (int(pair[0]), int(pair[1]))
    return checked


def _open(model: Any, label: str, opened: dict) -> tuple:
    """Open ``model`` into ``opened`` once, however many slices read it, and return its key there (a path by its
    resolved location, another model by identity)."""
    key = ("path", str(Path(model).expanduser().resolve())) if isinstance(model, (str, Path)) else ("id", id(model))
    if key not in opened:
        opened[key] = open_model(model, label)
    return key


def _config_edits(config_folder: Path | None, parts: list[MergePart], total_layers: int) -> dict:
    """config.json's layer count (whichever key it uses) set to the stack's; a per-layer list (``layer_types``)
    rebuilt from the layers each slice took, where every source's config has one."""
    config = _read_config(config_folder)
    if config is None:
        return {}
    edits = {key: total_layers for key in LAYER_COUNT_KEYS if key in config}
    if isinstance(config.get("layer_types"), list):
        stacked = []
        for part in parts:
            window = part.models[0]
            source_types = (_read_config(window.folder) or {}).get("layer_types")
            if not isinstance(source_types, list) or len(source_types) < window.end:
                return edits  # unknown for some slice: leave the list to the user
            stacked += source_types[window.start:window.end]
        edits["layer_types"] = stacked
    return edits


def _read_config(folder: Path | None) -> dict | None:
    config = model_json(folder, "config.json")
    if config is not None and not isinstance(config, dict):
        raise ModelInputError(f"{folder / 'config.json'} does not hold a JSON object")
    return config
