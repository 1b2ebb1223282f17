"""The bad-input matrix: each malformed or lying input fails with its own error naming the file, tensor or path,
before anything is written, and leaves every existing file as it was."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

import nbmerge
from nbmerge.errors import ModelInputError, ParameterError, RecipeError
from nbmerge.recipes import parse_recipe

GOOD = {"a": torch.randn(8, 4), "b": torch.randn(16)}
DATA = bytes(192)  # room for a (128 bytes) and b (64 bytes)


def raw(path, header, data=DATA, header_len=None):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data)


def entries(**specs):
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": offsets} for name, (dtype, shape, offsets)
            in specs.items()}


DUPLICATE = (b'{"a": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}, '
             b'"a": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}, '
             b'"b": {"dtype": "F32", "shape": [16], "data_offsets": [128, 192]}}')

FILE_CASES = {
    "truncated": (lambda p, good: p.write_bytes(good.read_bytes()[:60]), ModelInputError,
                  r"bad.safetensors: not a safetensors file \(header length \d+ does not fit in 60 bytes\)"),
    "huge header length": (lambda p, good: raw(p, b"{}", header_len=2**62), ModelInputError,
                           "bad.safetensors: not a safetensors file"),
    "non-UTF-8 header": (lambda p, good: raw(p, b'{"a\xff": 1}'), ModelInputError, "header is not JSON"),
    "header not an object": (lambda p, good: raw(p, b"[1, 2]"), ModelInputError, "header is not a JSON object"),
    "unknown dtype": (lambda p, good: raw(p, entries(a=("F33", [8, 4], [0, 128]), b=("F32", [16], [128, 192]))),
                      ModelInputError, "tensor 'a' has a malformed header entry"),
    "offsets beyond the file": (lambda p, good: raw(p, entries(a=("F32", [8, 4], [0, 128]),
                                                               b=("F32", [16], [128, 999]))),
                                ModelInputError, r"tensor 'b' byte range \[128, 999\)"),
    "offsets disagree with the shape": (lambda p, good: raw(p, entries(a=("F32", [8, 4], [0, 100]),
                                                                       b=("F32", [16], [128, 192]))),
                                        ModelInputError, "tensor 'a' byte range .* does not match its shape"),
    "overlapping tensors": (lambda p, good: raw(p, entries(a=("F32", [8, 4], [0, 128]), b=("F32", [16], [64, 128]))),
                            ModelInputError, "tensors 'a' and 'b' overlap in the file"),
    "duplicate keys": (lambda p, good: raw(p, DUPLICATE), ModelInputError, "names tensor 'a' twice"),
    "mismatched shape": (lambda p, good: save_file({"a": torch.randn(4, 8), "b": torch.randn(16)}, p),
                         ModelInputError, r"tensor 'a': shape \[4, 8\] in .*bad.safetensors"),
    "missing key": (lambda p, good: save_file({"a": torch.randn(8, 4)}, p), ModelInputError,
                    "bad.safetensors lacks 1 tensor.*'b'"),
    "integer against float": (lambda p, good: save_file({"a": torch.zeros(8, 4, dtype=torch.int32),
                                                         "b": torch.randn(16)}, p),
                              ModelInputError, "tensor 'a': torch.int32 in .*bad.safetensors"),
}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(GOOD, path)
    return path


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_malformed_file_fails_by_name_and_nothing_changes(tmp_path, good, case):
    make, error, message = FILE_CASES[case]
    bad = tmp_path / "bad.safetensors"
    make(bad, good)
    existing = tmp_path / "merged.safetensors"  # an earlier result, asked to be overwritten
    save_file({"old": torch.ones(2)}, existing)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message):
        nbmerge.merge("simple_average", [good, bad], out=existing, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before


INDEX_CASES = {
    "missing shard": ({"a": "model-1.safetensors", "b": "model-2.safetensors"},
                      "lists shards that do not exist: model-2.safetensors"),
    "path climbing out": ({"a": "../good.safetensors", "b": "model-1.safetensors"},
                          "names a shard outside its folder: '../good.safetensors'"),
    "absolute path": (None, "names a shard outside its folder: '/"),
    "tensor the shard lacks": ({"a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-1.safetensors"},
                               "lists tensor 'c' in model-1.safetensors, which does not hold it"),
    "not a mapping": (["model-1.safetensors"], "weight_map must map tensor names to shard file names"),
}


@pytest.mark.parametrize("case", INDEX_CASES)
def test_a_lying_shard_index_fails_by_name(tmp_path, good, case):
    weight_map, message = INDEX_CASES[case]
    if weight_map is None:
        weight_map = {"a": str(good), "b": "model-1.safetensors"}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(good, folder / "model-1.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = snapshot(tmp_path)
    with pytest.raises(ModelInputError, match=message):
        nbmerge.merge("simple_average", [good, folder], out=tmp_path / "out", progress=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["the input file", "inside the input folder", "the folder holding an input"])
def test_an_output_overlapping_an_input_is_refused_before_anything_is_read(tmp_path, good, where):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({k: v + 1 for k, v in GOOD.items()}, folder / "model.safetensors")
    out = {"the input file": good, "inside the input folder": folder / "merged",
           "the folder holding an input": tmp_path}[where]
    before = snapshot(tmp_path)
    with pytest.raises(ParameterError, match="out: .* overlaps the input"):
        nbmerge.merge("simple_average", [good, folder], out=out, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before


def test_recipes_refuse_python_tags_and_do_not_expand_alias_bombs():
    with pytest.raises(RecipeError, match="not valid YAML.*python/object/apply"):
        parse_recipe("method: !!python/object/apply:os.system ['echo owned']\nmodels: [a, b]")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(RecipeError, match="aliases expand to more than 100000 values"):  # 9^9 leaves if expanded
        parse_recipe(bomb + "method: ties\nmodels: [m1, m2]")
