"""NaN and Inf: refused in inputs (naming the model, file and tensor) and in results, unless allowed."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.cli import main as cli_main
from nbmerge.engine.stream import finite
from nbmerge.errors import NonFiniteError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_finite_finds_one_bad_entry_anywhere(dtype, value):
    for position in (0, 1, 63, 64, 4097, 99_999):
        tensor = torch.randn(100_000).to(dtype)
        assert finite(tensor)
        tensor[position] = value
        assert not finite(tensor), position
    assert finite(torch.tensor([], dtype=dtype)) and finite(torch.arange(5))


def _inputs(tmp_path, bad_value, bad_tensor="b"):
    """Two models of two tensors in files; the second model's ``bad_tensor`` holds ``bad_value`` at one entry."""
    first = {"a": torch.randn(64, 32), "b": torch.randn(1000)}
    second = {name: tensor + 0.1 for name, tensor in first.items()}
    second[bad_tensor].view(-1)[17] = bad_value
    paths = [tmp_path / "first.safetensors", tmp_path / "second.safetensors"]
    save_file(first, paths[0])
    save_file(second, paths[1])
    return paths


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method, params", [("simple_average", {}), ("ties", {"density": 0.5})])
def test_an_input_with_nan_or_inf_is_refused_by_name_and_nothing_is_written(tmp_path, bad_value, method, params):
    paths = _inputs(tmp_path, bad_value)
    out = tmp_path / "merged"
    base = paths[0] if method == "ties" else None
    with pytest.raises(NonFiniteError, match=r"second.safetensors\).*tensor 'b' holds NaN or Inf.*allow_nonfinite"):
        nbmerge.merge(method, paths, base=base, out=out, progress=False, **params)
    assert sorted(os.listdir(tmp_path)) == ["first.safetensors", "second.safetensors"]


def test_an_existing_output_is_left_unchanged_when_an_input_is_refused(tmp_path):
    paths = _inputs(tmp_path, float("nan"), bad_tensor="a")
    out = tmp_path / "merged.safetensors"
    save_file({"old": torch.ones(3)}, out)
    before = out.read_bytes()
    with pytest.raises(NonFiniteError, match="tensor 'a'"):
        nbmerge.merge("simple_average", paths, out=out, overwrite=True, progress=False)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["first.safetensors", "merged.safetensors", "second.safetensors"]


def test_allow_nonfinite_merges_what_was_refused(tmp_path):
    paths = _inputs(tmp_path, float("nan"))
    merged = nbmerge.merge("simple_average", paths, allow_nonfinite=True, progress=False).state_dict
    first, second = load_file(paths[0]), load_file(paths[1])
    assert torch.isnan(merged["b"][17])
    keep = torch.arange(1000) != 17
    assert torch.allclose(merged["b"][keep], (first["b"][keep] + second["b"][keep]) / 2)


def test_an_in_memory_input_is_named_by_its_label():
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteError, match=r"^ft_b: tensor 'w' holds NaN"):
        nbmerge.merge("simple_average", {"ft_a": {"w": torch.ones(2)}, "ft_b": bad}, progress=False)


def test_a_result_that_overflows_its_dtype_is_refused(tmp_path):
    """Finite float32 inputs whose task arithmetic lands beyond float16's range (65504) when stored as float16."""
    base = {"w": torch.zeros(8), "v": torch.zeros(4)}
    model = {"w": torch.full((8,), 1000.0), "v": torch.ones(4)}
    out = tmp_path / "merged.safetensors"
    with pytest.raises(NonFiniteError, match=r"task_arithmetic: the merged tensor 'w' holds NaN or Inf.*float16"):
        nbmerge.merge("task_arithmetic", [model], base=base, scaling=100.0, out_dtype="float16", out=out,
                      progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []
    kept = nbmerge.merge("task_arithmetic", [model], base=base, scaling=100.0, out_dtype="float16",
                         allow_nonfinite=True, progress=False).state_dict
    assert torch.isinf(kept["w"]).all() and torch.equal(kept["v"], torch.full((4,), 100.0, dtype=torch.float16))


def test_the_cli_refuses_in_one_line_and_takes_the_flag(tmp_path, capsys):
    paths = [str(p) for p in _inputs(tmp_path, float("-inf"))]
    assert cli_main(["merge", "simple_average", *paths, "--out", str(tmp_path / "m"), "--quiet"]) != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "tensor 'b' holds NaN or Inf" in error
    assert not (tmp_path / "m").exists()
    assert cli_main(["merge", "simple_average", *paths, "--out", str(tmp_path / "m"), "--allow-nonfinite",
                     "--quiet"]) == 0
    assert torch.isneginf(load_file(tmp_path / "m" / "model.safetensors")["b"][17])
