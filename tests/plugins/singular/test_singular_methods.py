"""TSV-M, Iso-C and Iso-CTS against their formulas written out in float64 NumPy (FusionBench's construction: the
zero-padded concatenations, the m × m projector), cases where the answer is known in closed form, and the CLI
and magic front ends with these methods' own flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import load_folder
from IPython.core.interactiveshell import InteractiveShell
from method_cases import BIAS, EMBED, FINAL_NORM, HEAD, LAYER_NORM, UP, Q, assert_matches, decoder_state, \
    f64, fine_tuned, merge, randn

import nbmerge
from nbmerge.cli import main as cli_main
from nbmerge.errors import ParameterError


def float64_set(n_models: int = 3):
    """A decoder with k = 9 singular directions per block matrix (12 × 9 embeddings and head), in float64."""
    base = {k: v.double() for k, v in decoder_state(num_layers=2, hidden=9, vocab=12).items()}
    models = [{k: v.double() for k, v in fine_tuned(base, seed=s).items()} for s in range(1, n_models + 1)]
    return base, models


def polar(a: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(a, full_matrices=False)
    return u @ vh


def tsv_m_reference(base, models, scaling=1.0, weights=None) -> dict[str, np.ndarray]:
    """Per matrix: top r = int(k/T) of each task's SVD in a zero-padded [m, k] / [k, n] block, polar factors,
    U diag(s) Vᵀ; elsewhere the mean (weighted) task vector; θ_0 + λ Δ."""
    n = len(models)
    weights = weights or [1.0] * n
    result = {}
    for name, b in base.items():
        taus = [w * (f64(m[name]) - f64(b)) for m, w in zip(models, weights)]
        if b.dim() != 2:
            result[name] = f64(b) + scaling * sum(taus) / n
            continue
        k = min(b.shape)
        r = int(k * (1 / n))
        u_all, s_all, vh_all = np.zeros((b.shape[0], k)), np.zeros(k), np.zeros((k, b.shape[1]))
        for i, tau in enumerate(taus):
            u, s, vh = np.linalg.svd(tau, full_matrices=False)
            u_all[:, i * r:(i + 1) * r], s_all[i * r:(i + 1) * r], vh_all[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]
        result[name] = f64(b) + scaling * polar(u_all) @ np.diag(s_all) @ polar(vh_all)
    return result


def iso_c_reference(base, models, scaling=1.0) -> dict[str, np.ndarray]:
    result = {}
    for name, b in base.items():
        total = sum(f64(m[name]) - f64(b) for m in models)
        if b.dim() == 2:
            u, s, vh = np.linalg.svd(total, full_matrices=False)
            result[name] = f64(b) + scaling * s.mean() * u @ vh
        else:
            result[name] = f64(b) + scaling * total / len(models)
    return result


def iso_cts_reference(base, models, scaling=1.0, fraction=0.8) -> dict[str, np.ndarray]:
    """Common directions c = k − round((k − int(k f)) / T) T of Σ τ_i; d = (k − c) / T of each τ_i − P τ_i with
    the projector P = U_c U_cᵀ; task blocks first, common last; polar factors; the mean kept singular value."""
    n, result = len(models), {}
    for name, b in base.items():
        taus = [f64(m[name]) - f64(b) for m in models]
        if b.dim() != 2:
            result[name] = f64(b) + scaling * sum(taus) / n
            continue
        k = min(b.shape)
        c = k - round((k - int(k * fraction)) / n) * n
        d = (k - c) // n
        u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
        projector = u[:, :c] @ u[:, :c].T
        blocks = [np.linalg.svd(tau - projector @ tau, full_matrices=False) for tau in taus]
        u_all = np.concatenate([bu[:, :d] for bu, _, _ in blocks] + [u[:, :c]], axis=1)
        s_all = np.concatenate([bs[:d] for _, bs, _ in blocks] + [s[:c]])
        vh_all = np.concatenate([bvh[:d] for _, _, bvh in blocks] + [vh[:c]], axis=0)
        result[name] = f64(b) + scaling * s_all.mean() * polar(u_all) @ polar(vh_all)
    return result


def assert_all_match(merged, expected, atol=1e-10):
    assert set(merged) == set(expected)
    for name in expected:
        assert merged[name].dtype == torch.float64, name
        assert_matches(merged[name], expected[name], atol=atol, rtol=0, name=name)


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("params", [{}, {"scaling": 0.6, "weights": [2.0, -0.5, 1.0]}], ids=["defaults", "weighted"])
def test_tsv_m_is_its_formula_in_float64(n_models, params):
    base, models = float64_set(n_models)
    if "weights" in params:
        params = {**params, "weights": params["weights"][:n_models]}
    assert_all_match(merge("tsv_m", models, base=base, **params), tsv_m_reference(base, models, **params))


@pytest.mark.parametrize("scaling", [1.0, 1.5])
def test_iso_c_is_its_formula_in_float64(scaling):
    base, models = float64_set()
    assert_all_match(merge("iso_c", models, base=base, scaling=scaling), iso_c_reference(base, models, scaling))


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_iso_cts_is_its_formula_in_float64(fraction):
    base, models = float64_set()
    merged = merge("iso_cts", models, base=base, common_space_fraction=fraction, scaling=1.3)
    assert_all_match(merged, iso_cts_reference(base, models, 1.3, fraction))


def test_tsv_m_of_one_model_is_task_arithmetic():
    """T = 1 keeps every direction and the factors are already orthonormal: θ_0 + λ τ."""
    base, models = float64_set(1)
    merged = merge("tsv_m", models, base=base, scaling=0.4)
    for name in base:
        assert_matches(merged[name], f64(base[name]) + 0.4 * (f64(models[0][name]) - f64(base[name])), atol=1e-12)


def test_tsv_m_adds_task_vectors_that_live_in_orthogonal_subspaces():
    """Two rank-3 task vectors on disjoint row and column blocks of an 8 × 6 matrix (k = 6, T = 2, r = 3): each
    keeps all its directions, the concatenated factors are already orthonormal, and the merge is the plain sum."""
    name = UP.format(0)
    base = {name: randn(8, 6, seed=0, dtype=torch.float64)}
    first, second = torch.zeros(8, 6, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.float64)
    first[0:3, 0:3] = randn(3, 3, seed=1, dtype=torch.float64)
    second[4:7, 3:6] = randn(3, 3, seed=2, dtype=torch.float64)
    merged = merge("tsv_m", [{name: base[name] + first}, {name: base[name] + second}], base=base)[name]
    assert_matches(merged, f64(base[name] + first + second), atol=1e-12)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vector():
    base, models = float64_set()
    merged = merge("iso_c", models, base=base)
    for name in (Q.format(0), UP.format(1), EMBED, HEAD):
        total = sum(f64(m[name]) - f64(base[name]) for m in models)
        spectrum = np.linalg.svd(f64(merged[name]) - f64(base[name]), compute_uv=False)
        np.testing.assert_allclose(spectrum, np.linalg.svd(total, compute_uv=False).mean(), rtol=1e-10)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    """f = 1 leaves no task-specific directions (c = k, d = 0): Iso-CTS is Iso-C."""
    base, models = float64_set()
    iso_c = merge("iso_c", models, base=base, scaling=1.2)
    iso_cts = merge("iso_cts", models, base=base, scaling=1.2, common_space_fraction=1.0)
    assert_all_match(iso_cts, {name: f64(tensor) for name, tensor in iso_c.items()}, atol=1e-12)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_vectors_get_the_scaled_mean_task_vector(method):
    base, models = float64_set()
    merged = merge(method, models, base=base, scaling=0.5)
    for name in (BIAS.format(0), LAYER_NORM.format(1), FINAL_NORM):
        mean = sum(f64(m[name]) - f64(base[name]) for m in models) / len(models)
        assert_matches(merged[name], f64(base[name]) + 0.5 * mean, atol=1e-12, name=name)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_bf16_inputs_are_merged_in_float32_and_stored_as_bf16(method):
    """The SVDs run on float32 copies (FusionBench fails on bfloat16 SVDs on the CPU); one rounding at the end."""
    base32, models32 = float64_set()
    base = {k: v.to(torch.bfloat16) for k, v in base32.items()}
    models = [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in models32]
    merged = merge(method, models, base=base)
    in_float32 = merge(method, [{k: v.float() for k, v in m.items()} for m in models],
                       base={k: v.float() for k, v in base.items()})
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, in_float32[name].to(torch.bfloat16)), name


def test_iso_cts_names_a_matrix_too_narrow_to_split_among_the_tasks():
    """k = 5, T = 3, f = 0: c = 5 − round(5/3)·3 = −1 (FusionBench fails on a shape mismatch)."""
    name = UP.format(0)
    base = {name: randn(7, 5, seed=0)}
    models = [{name: base[name] + randn(7, 5, seed=s)} for s in (1, 2, 3)]
    with pytest.raises(ParameterError, match=rf"iso_cts: tensor '{name}' of shape \(7, 5\) .* 3 tasks"):
        merge("iso_cts", models, base=base, common_space_fraction=0.0)


def test_an_svd_that_cannot_converge_is_an_error_naming_the_tensor():
    """NaN merged on purpose (allow_nonfinite): float32 fails, the float64 retry fails, and the error says where."""
    name = UP.format(0)
    base = {name: torch.zeros(4, 3)}
    broken = torch.ones(4, 3)
    broken[1, 1] = float("nan")
    with pytest.raises(nbmerge.ModelInputError, match=rf"tensor '{name}': the SVD of its task vectors did not "):
        nbmerge.merge("iso_c", [{name: broken}, {name: torch.ones(4, 3)}], base=base, allow_nonfinite=True,
                      progress=False)


def test_cli_flags_of_the_singular_methods(llama_set, tmp_path, capsys):
    dirs, base_dir = [str(d) for d in llama_set.model_dirs], str(llama_set.base_dir)
    runs = [("tsv_m", ["--scaling", "0.8", "--weights", "1,0.5,2"], {"scaling": 0.8, "weights": [1, 0.5, 2]}),
            ("iso_cts", ["--common-space-fraction", "0.5", "--scaling", "1.2"],
             {"common_space_fraction": 0.5, "scaling": 1.2})]
    for method, flags, params in runs:
        out = tmp_path / method
        assert cli_main(["merge", method, *dirs, "--base", base_dir, "--out", str(out), *flags, "--quiet"]) == 0
        api = nbmerge.merge(method, llama_set.model_dirs, base=llama_set.base_dir, progress=False, **params)
        from_cli = load_folder(out)
        assert all(torch.equal(from_cli[k], v) for k, v in api.state_dict.items())
    code = cli_main(["merge", "iso_cts", *dirs, "--base", base_dir, "--common-space-fraction", "1.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("nbmerge: error: iso_cts: parameter 'common_space_fraction'")


def test_merge_magic_runs_iso_c(llama_set):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbmerge")
    shell.user_ns.update(base=llama_set.base, ft0=llama_set.models[0], ft1=llama_set.models[1])
    result = shell.run_cell("%merge iso_c ft0 ft1 --base base --scaling 1.3 --quiet -o merged")
    assert result.error_in_exec is None and result.error_before_exec is None
    api = nbmerge.merge("iso_c", llama_set.models[:2], base=llama_set.base, scaling=1.3, progress=False)
    assert all(torch.equal(shell.user_ns["merged"].state_dict[k], v) for k, v in api.state_dict.items())
