"""Fuzz targets (hypothesis) for the parsers of untrusted text: the safetensors header reader and the recipe
parser. Whatever the bytes, the reader returns entries that lie inside the file without overlapping, or raises
ModelInputError; the recipe parser returns a MergeCall or raises RecipeError. Nothing else may escape. The same
contract holds for the header's numeric fields of every JSON type, shard indexes, tokenizer and config JSON, and
LoRA adapter configs (ModelInputError, or a usable result).

The suite runs a brief pass; ``scripts/fuzz.py --minutes 10`` runs the same targets for longer
(``NBMERGE_FUZZ_EXAMPLES`` sets the examples per target).
"""

from __future__ import annotations

import json
import os
import struct

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from nbmerge.errors import ModelInputError, RecipeError
from nbmerge.io.safetensors import DTYPES, read_header, read_tensor
from nbmerge.recipes import MergeCall, parse_recipe

EXAMPLES = int(os.environ.get("NBMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="NBMERGE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALID = save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
                    "c": torch.zeros(0), "d": torch.arange(3)})


def check_file(path, data: bytes) -> None:
    """The reader's contract on one file's bytes."""
    path.write_bytes(data)
    try:
        entries, metadata = read_header(path)
    except ModelInputError:
        return
    assert isinstance(metadata, dict)
    size, previous_end = len(data), 0
    for name, entry in entries.items():
        assert 8 <= entry.start <= entry.end <= size, name
        assert entry.start >= previous_end or entry.nbytes == 0, name
        previous_end = max(previous_end, entry.end)
        with open(path, "rb") as f:
            tensor = read_tensor(f, entry)
        assert tuple(tensor.shape) == entry.shape and tensor.dtype == entry.dtype


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(tmp_path_factory, data):
    check_file(tmp_path_factory.mktemp("fuzz") / "x.safetensors", data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))
def test_mutated_valid_files(tmp_path_factory, flips, keep):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    check_file(tmp_path_factory.mktemp("fuzz") / "x.safetensors", bytes(data[:keep]))


DTYPE_NAMES = st.sampled_from(sorted(DTYPES) + ["F33", "", "f32", "I128"])
SPEC = st.fixed_dictionaries({
    "dtype": st.one_of(DTYPE_NAMES, st.integers()),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 300), min_size=0, max_size=3), st.none()),
})


@FUZZ
@given(st.dictionaries(st.text(max_size=6), st.one_of(SPEC, st.integers(), st.text(max_size=4)), max_size=5),
       st.integers(0, 300))
def test_structured_headers(tmp_path_factory, header, data_size):
    encoded = json.dumps(header).encode()
    data = struct.pack("<Q", len(encoded)) + encoded + bytes(data_size)
    check_file(tmp_path_factory.mktemp("fuzz") / "x.safetensors", data)


def check_recipe(text: str) -> None:
    try:
        call = parse_recipe(text)
    except RecipeError:
        return
    assert isinstance(call, MergeCall) and isinstance(call.method, str) and call.models


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_recipe_text(text):
    check_recipe(text)


VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                                st.text(max_size=8)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=12)
KEYS = st.sampled_from(["merge_method", "method", "models", "base_model", "base", "parameters", "params", "slices",
                        "dtype", "out_dtype", "sources", "layer_range", "model", "density", "weight", "t",
                        "filter", "value", "tokenizer_source", "out", "overwrite"])


@FUZZ
@given(st.dictionaries(KEYS, st.one_of(VALUES, st.sampled_from(["ties", "linear", "slerp", "task_arithmetic",
                                                                "dare_ties"])), min_size=1, max_size=6))
def test_structured_recipes(config):
    check_recipe(yaml.safe_dump(config))


LAYER_RANGES = st.one_of(st.lists(st.integers(-2, 40), min_size=0, max_size=3), VALUES)
MERGEKIT_SOURCE = st.fixed_dictionaries({"model": st.sampled_from(["a", "b", "c"]), "layer_range": LAYER_RANGES},
                                        optional={"parameters": VALUES})
NBMERGE_SLICE = st.fixed_dictionaries({"models": st.one_of(st.lists(st.sampled_from(["a", "b"]), max_size=2),
                                                           VALUES),
                                       "layers": LAYER_RANGES},
                                      optional={"method": st.sampled_from(["passthrough", "linear", "slerp", "x"]),
                                                "params": VALUES, "base": st.sampled_from(["a", "c"]),
                                                "base_layers": LAYER_RANGES})


@FUZZ
@given(st.one_of(
    st.fixed_dictionaries({"slices": st.lists(st.fixed_dictionaries({"sources": st.lists(MERGEKIT_SOURCE,
                                                                                             max_size=3)}),
                                              max_size=3),
                           "merge_method": st.sampled_from(["passthrough", "slerp", "linear", "ties", "della"])},
                          optional={"base_model": st.sampled_from(["a", "b"]), "parameters": VALUES,
                                    "dtype": st.sampled_from(["float16", "bfloat16", "int8"])}),
    st.fixed_dictionaries({"slices": st.lists(NBMERGE_SLICE, max_size=3)}, optional={"out_dtype": VALUES})))
def test_structured_slice_recipes(config):
    """mergekit ``slices: [{sources: [{model, layer_range}]}]`` and nbmerge ``slices: [{models, layers}]``: a call
    whose every slice names its models and a [start, end] pair of ints, or one RecipeError."""
    try:
        call = parse_recipe(yaml.safe_dump(config))
    except RecipeError:
        return
    assert isinstance(call, MergeCall) and call.models
    for piece in call.slices or []:
        assert piece.models and all(isinstance(v, int) for pair in piece.layers.values() for v in pair)


# -- the other parsers of untrusted files (nbmerge.io.untrusted and its users) ---------------------------------

FILE_FUZZ = settings(FUZZ, max_examples=min(EXAMPLES, 60))  # each example writes and opens files
NUMBERS = st.one_of(st.integers(-3, 300), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=3), st.none())


@FILE_FUZZ
@given(st.lists(NUMBERS, max_size=3), st.lists(NUMBERS, max_size=3), st.integers(0, 300))
def test_header_numeric_fields(tmp_path_factory, shape, offsets, data_size):
    """Shapes and offsets of any JSON type (huge, negative, NaN, ±Inf, floats, booleans, strings): only
    non-negative integers that fit the file and the shape are accepted."""
    encoded = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    check_file(path, struct.pack("<Q", len(encoded)) + encoded + bytes(data_size))
    try:
        entries, _ = read_header(path)
    except ModelInputError:
        return
    assert all(type(v) is int and v >= 0 for v in [*shape, *offsets])
    assert entries["t"].shape == tuple(shape)


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 2 ** 66), st.floats(allow_nan=True),
                                     st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=10)
SHARD_NAMES = st.sampled_from(["model.safetensors", "x.safetensors", "../model.safetensors", "/etc/passwd", "", ".",
                               "sub/model.safetensors"])


def json_text(value) -> str:
    return json.dumps(value)


@FILE_FUZZ
@given(st.one_of(st.fixed_dictionaries({"weight_map": st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(SHARD_NAMES, JSON_VALUES), max_size=3),
    JSON_VALUES)}), JSON_VALUES).map(json_text) | st.text(max_size=40))
def test_shard_indexes(tmp_path_factory, text):
    """A model folder's shard index: a source whose tensors are those the index lists, or ModelInputError."""
    from nbmerge.io.sources import open_model

    folder = tmp_path_factory.mktemp("fuzz") / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(text)
    try:
        source = open_model(folder, "m")
    except ModelInputError:
        return
    try:
        assert set(json.loads(text)["weight_map"]) <= {"a", "b"} and set(source.infos) == {"a", "b"}
    finally:
        source.close()


@FILE_FUZZ
@given(st.one_of(JSON_VALUES.map(json_text), st.text(max_size=40),
                 st.fixed_dictionaries({"model": st.fixed_dictionaries({"vocab": JSON_VALUES})},
                                       optional={"added_tokens": JSON_VALUES}).map(json_text)),
       st.sampled_from(["tokenizer.json", "vocab.json"]))
def test_tokenizer_files(tmp_path_factory, text, name):
    """A vocabulary read from tokenizer.json or vocab.json: token -> non-negative int id, or ModelInputError."""
    from nbmerge.io.tokenizers import read_vocabulary

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / name).write_text(text)
    try:
        table = read_vocabulary(folder, "m")
    except ModelInputError:
        return
    assert isinstance(table, dict) and all(isinstance(k, str) and type(v) is int and v >= 0
                                           for k, v in table.items())


CONFIG_VALUES = st.one_of(JSON_VALUES, st.sampled_from([4, 8, "llama", ["LlamaForCausalLM"]]))


@FILE_FUZZ
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(["architectures", "model_type", "hidden_size", "vocab_size",
                                                           "text_config", "num_hidden_layers"]), CONFIG_VALUES,
                                          max_size=4).map(json_text),
                          JSON_VALUES.map(json_text), st.text(max_size=20)), min_size=2, max_size=3))
def test_config_files(tmp_path_factory, texts):
    """Models' config.json compared: agreement, or ModelInputError naming the field or the file."""
    from nbmerge.io.model_configs import check_configs_agree
    from nbmerge.io.sources import StateDictSource

    sources = []
    for i, text in enumerate(texts):
        folder = tmp_path_factory.mktemp("fuzz")
        (folder / "config.json").write_text(text)
        sources.append(StateDictSource({}, f"m{i}", folder))
    try:
        check_configs_agree(sources)
    except ModelInputError as exc:
        assert "config.json" in str(exc)


@FILE_FUZZ
@given(st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora",
                                        "bias", "use_dora"]),
                       st.one_of(JSON_VALUES, st.sampled_from(["LORA", "none"]),
                                 st.dictionaries(st.sampled_from(["mlp", "(m", "(a+)+$", r"(x)\1", "x{5000}", ".*"]),
                                                 st.one_of(st.integers(-1, 8), JSON_VALUES), max_size=2)),
                       max_size=5))
def test_adapter_configs(tmp_path_factory, config):
    """An adapter_config.json: the adapter applied (a finite result), or ModelInputError."""
    from nbmerge.io.lora import WithLora
    from nbmerge.io.sources import open_model

    root = tmp_path_factory.mktemp("fuzz")
    save_file({"model.mlp.weight": torch.ones(4, 3)}, root / "model.safetensors")
    (root / "adapter").mkdir()
    save_file({"base_model.model.model.mlp.lora_A.weight": torch.ones(2, 3),
               "base_model.model.model.mlp.lora_B.weight": torch.ones(4, 2)}, root / "adapter" /
              "adapter_model.safetensors")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    try:
        source = open_model(WithLora(root / "model.safetensors", root / "adapter"), "m")
    except ModelInputError:
        return
    try:
        assert torch.isfinite(source.read("model.mlp.weight")).all()
    finally:
        source.close()
