"""Fuzz targets (hypothesis) for the two parsers of untrusted text: the safetensors header reader and the recipe
parser. Whatever the bytes, the reader returns entries that lie inside the file without overlapping, or raises
ModelInputError; the recipe parser returns a MergeCall or raises RecipeError. Nothing else may escape.

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
from safetensors.torch import save

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
