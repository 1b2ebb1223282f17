"""arcee_fusion against its formula written out in float64 NumPy (METHODS.md's reading of mergekit 0.1.5)."""

import numpy as np
import pytest
import torch
from method_cases import UP, decoder_state, f64, fine_tuned, merge, randn

import nbmerge_plugins.interpolation.arcee_fusion as arcee_fusion
from nbmerge.errors import ParameterError


def fusion_reference(model: torch.Tensor, base: torch.Tensor, with_margin: bool = False):
    """θ_0 + τ ⊙ [s ≥ median + 1.5 IQR], s = |τ| · KL per row, quantiles at ⌊q (n − 1)⌋ of the sorted s (and, with
    ``with_margin``, |s − threshold| / threshold per entry: where float32 rounding may decide the mask)."""
    theta, theta0 = f64(model), f64(base)
    rows, rows0 = theta.reshape(-1, theta.shape[-1]), theta0.reshape(-1, theta0.shape[-1])

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(rows) + 1e-8, softmax(rows0) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=1, keepdims=True)
    importance = (np.abs(rows - rows0) * kl).reshape(theta.shape)
    ordered = np.sort(importance.reshape(-1))
    q1, median, q3 = (ordered[int(f * (ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    merged = theta0 + (theta - theta0) * (importance >= threshold)
    return (merged, np.abs(importance - threshold) / threshold) if with_margin else merged


def test_every_tensor_keeps_the_changes_whose_importance_is_an_outlier():
    base = decoder_state(num_layers=2, hidden=16, vocab=32, seed=0)
    model = fine_tuned(base, seed=1, scale=0.3)
    merged = merge("arcee_fusion", [model], base=base)
    for name, tensor in merged.items():
        expected = fusion_reference(model[name], base[name])
        np.testing.assert_allclose(f64(tensor), expected, atol=1e-6, err_msg=name)
    # a few percent of each matrix's entries move (the outliers), the rest stay at the base's
    moved = (merged[UP.format(0)] != base[UP.format(0)]).float().mean().item()
    assert 0.0 < moved < 0.3


def test_quartiles_are_exact_over_a_million_entries_and_row_blocks_change_nothing(monkeypatch):
    base = {"w": randn(1100, 1000, seed=3)}  # 1.1 M entries: mergekit would sample 10⁶ of them at random
    model = {"w": base["w"] + 0.2 * randn(1100, 1000, seed=4)}
    whole = merge("arcee_fusion", [model], base=base)["w"]
    expected, margin = fusion_reference(model["w"], base["w"], with_margin=True)
    differing = np.abs(f64(whole) - expected) > 1e-6
    assert differing.sum() < 20 and (margin[differing] < 1e-4).all()  # only entries at the threshold, to rounding
    assert ((f64(whole) != f64(base["w"])).mean()) > 0.01
    monkeypatch.setattr(arcee_fusion, "ROW_BLOCK", 3000)  # three rows per softmax block
    assert torch.equal(merge("arcee_fusion", [model], base=base)["w"], whole)


def test_identical_models_give_the_base_and_a_vector_is_one_row():
    base = {"v": torch.tensor([0.5, -1.0, 2.0, 0.25]), "s": torch.tensor(1.5)}
    assert all(torch.equal(t, base[n]) for n, t in merge("arcee_fusion", [base], base=base).items())
    model = {"v": torch.tensor([0.5, -1.0, 2.0, 3.25]), "s": torch.tensor(2.0)}
    merged = merge("arcee_fusion", [model], base=base)
    # one entry changed: its importance alone is above the (zero) quartiles, so it is taken
    assert torch.equal(merged["v"], model["v"]) and torch.equal(merged["s"], model["s"])


def test_it_takes_a_base_and_exactly_one_model():
    base = decoder_state(seed=0)
    with pytest.raises(ParameterError, match="arcee_fusion: needs a base"):
        merge("arcee_fusion", [base])
    with pytest.raises(ParameterError, match="arcee_fusion: takes exactly 1"):
        merge("arcee_fusion", [fine_tuned(base, 1), fine_tuned(base, 2)], base=base)
