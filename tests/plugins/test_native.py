"""The fused C kernels (nbmerge_plugins/native/kernels.c through ctypes) against the methods' torch paths."""

import pytest
import torch

from nbmerge.method.declaration import TensorJob
from nbmerge_plugins import _selection, _task_vectors, native
from nbmerge_plugins.arithmetic import dare, ties


def job_of(models, base, **params):
    return TensorJob(name="layers.0.mlp.up_proj.weight", models=models, base=base, params=params, layer=0,
                     num_layers=1)


def random_job(n=3, positions=5000, seed=0, weights=None, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(positions, generator=generator, dtype=dtype)
    models = []
    for i in range(n):
        delta = torch.randn(positions, generator=generator, dtype=dtype) * (i + 1)
        delta[torch.rand(positions, generator=generator) < 0.1] = 0.0  # unchanged entries
        models.append(base + delta)
    for model in models:
        model[:7] = base[:7]  # a few positions no model changed
    return job_of(models, base, weights=weights)


def torch_ties(job, thresholds, sign, tie_sign, merge_func, scaling):
    """The torch path of ties._ties, run directly."""
    weights = job.params.get("weights") or [1.0] * len(job.models)
    trimmed = _task_vectors.trim(_task_vectors.weighted_task_vectors(job), thresholds)
    elected = _task_vectors.elect_sign(trimmed, sign, tie_sign)
    return job.base + scaling * _task_vectors.disjoint_merge(trimmed, elected, merge_func, weights)


def test_the_kernel_library_is_built_here():
    assert native.library() is not None, (
        "nbmerge_plugins._kernels was not built: reinstall nbmerge with a C compiler (pip install -e .)")


@pytest.mark.parametrize("sign", ["sum", "count"])
@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("weights", [None, [0.5, 1.0, 2.0]])
def test_fused_ties_merge_matches_the_torch_path(sign, merge_func, weights):
    job = random_job(weights=weights)
    magnitudes = _task_vectors.weighted_task_vectors(job).abs()
    # a real threshold per task vector (an entry's own magnitude, so exact ties with it are kept), and inf
    thresholds = [float(magnitudes[0].kthvalue(4000).values), float(magnitudes[1][123]), float("inf")]
    for tie_sign in (1.0, -1.0):
        expected = torch_ties(job, thresholds, sign, tie_sign, merge_func, 0.7)
        fused = native.ties_merge(job, thresholds, sign, tie_sign, merge_func, 0.7)
        torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(fused, job.base)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_inputs_are_read_as_stored_and_written_in_the_output_dtype(base_dtype):
    job = random_job(positions=6000, seed=5, weights=[1.0, 2.0, 0.5])
    job.models = [model.bfloat16() for model in job.models]
    job.base = job.base.to(base_dtype)
    thresholds = [0.4, 1.1, 0.9]
    expected = torch_ties(job.upcast(), thresholds, "sum", 1.0, "mean", 1.0)
    assert job.upcast().models[0].dtype == torch.float32
    fused = native.ties_merge(job, thresholds, "sum", 1.0, "mean", 1.0)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    job.out_dtype = torch.bfloat16
    fused_bf16 = native.ties_merge(job, thresholds, "sum", 1.0, "mean", 1.0)
    assert fused_bf16.dtype == torch.bfloat16
    # rounded to nearest even, like torch's conversion: the same bits wherever the float32 results agree
    agree = fused == expected
    assert agree.float().mean() > 0.99
    assert torch.equal(fused_bf16[agree], expected.bfloat16()[agree])


def test_bfloat16_rounding_of_halfway_values_and_nan():
    """Halfway cases round to even; NaN stays NaN: the output equals torch's float32 -> bfloat16 conversion."""
    halfway = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.0e38, float("nan"), 1e-40])
    base = torch.zeros(6)
    job = job_of([halfway], base)
    job.out_dtype = torch.bfloat16
    # one model, threshold 0, sum: the output is exactly base + τ = the input values
    fused = native.ties_merge(job, [0.0], "sum", 1.0, "sum", 1.0)
    expected = halfway.bfloat16()
    assert torch.equal(fused[:4].view(torch.int16), expected[:4].view(torch.int16))
    assert torch.isnan(fused[4]) and torch.equal(fused[5:].view(torch.int16), expected[5:].view(torch.int16))


def test_a_large_tensor_split_across_threads_gives_the_same_result(monkeypatch):
    job = random_job(positions=50_000, seed=6)
    thresholds = [0.3, 0.6, 0.9]
    brackets = [(0.2, 0.4), (0.0, 0.05), (1.0, 3.0)]
    whole = (native.ties_merge(job, thresholds, "sum", 1.0, "mean", 0.5), native.ties_sign_balance(job, thresholds,
             "count"), native.ties_band(job, brackets, 50_000))
    monkeypatch.setattr(native, "SPLIT_AT", 1000)
    monkeypatch.setattr(native, "PARTS", 3)
    assert len(native._ranges(50_000)) == 3
    native._workers.cache_clear()
    try:
        split = (native.ties_merge(job, thresholds, "sum", 1.0, "mean", 0.5),
                 native.ties_sign_balance(job, thresholds, "count"), native.ties_band(job, brackets, 50_000))
    finally:
        native._workers.cache_clear()
    assert torch.equal(split[0], whole[0]) and split[1] == whole[1]
    assert split[2][:2] == whole[2][:2]
    assert all(torch.equal(a, b) for a, b in zip(split[2][2], whole[2][2]))


def test_exact_sign_ties_take_the_tie_sign():
    base = torch.zeros(3)
    job = job_of([torch.tensor([2.0, 1.0, 0.0]), torch.tensor([-2.0, -1.0, 0.0])], base)
    plus = native.ties_merge(job, [0.0, 0.0], "count", 1.0, "mean", 1.0)
    minus = native.ties_merge(job, [0.0, 0.0], "count", -1.0, "mean", 1.0)
    assert plus.tolist() == [2.0, 1.0, 0.0] and minus.tolist() == [-2.0, -1.0, 0.0]


def test_sign_balance_counts_elected_signs_with_ties_as_zero():
    job = random_job(positions=3000, seed=1)
    thresholds = [0.5, 1.0, 1.5]
    for sign in ("sum", "count"):
        trimmed = _task_vectors.trim(_task_vectors.weighted_task_vectors(job), thresholds)
        expected = int(_task_vectors.elect_sign(trimmed, sign, 0.0).sum())
        assert native.ties_sign_balance(job, thresholds, sign) == expected


def test_band_pass_counts_and_collects_like_torch():
    job = random_job(positions=20000, seed=2, weights=[1.0, 0.25, 3.0])
    magnitudes = _task_vectors.weighted_task_vectors(job).abs()
    brackets = [(0.5, 1.0), (0.0, 0.1), (2.0, float("inf"))]
    changed, above, bands = native.ties_band(job, brackets, capacity=20000)
    assert changed == int((magnitudes != 0).any(0).sum())
    for i, (lo, hi) in enumerate(brackets):
        assert above[i] == int((magnitudes[i] > hi).sum())
        inside = magnitudes[i][(magnitudes[i] >= lo) & (magnitudes[i] <= hi)]
        assert torch.equal(bands[i], inside)  # same entries, in position order


def test_band_pass_reports_an_overflowing_band_instead_of_truncating_it():
    job = random_job(positions=20000, seed=3)
    changed, above, bands = native.ties_band(job, [(0.0, float("inf"))] * 3, capacity=100)
    assert bands is None and changed > 0


def test_jobs_the_kernels_do_not_cover_take_the_torch_path():
    assert native.accepts(random_job())
    assert not native.accepts(random_job(dtype=torch.float64))
    assert not native.accepts(random_job(n=17, positions=10))
    transposed = random_job(positions=100)
    transposed.base = transposed.base.view(10, 10).t()
    transposed.models = [model.view(10, 10).t() for model in transposed.models]
    assert not native.accepts(transposed)


def test_native_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("NBMERGE_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.accepts(random_job())
    finally:
        monkeypatch.delenv("NBMERGE_NATIVE")
        native.library.cache_clear()
    assert native.library() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_a_merge_is_the_same_with_and_without_the_kernels(monkeypatch, trim_scope, dtype):
    """End to end through nbmerge.merge: the thresholds (exact k-th largest) and the merged tensors agree."""
    from nbmerge import merge

    generator = torch.Generator().manual_seed(4)
    base = {f"layers.{i}.mlp.up_proj.weight": torch.randn(64, 48, generator=generator) for i in range(3)}
    models = [{name: (value + torch.randn(value.shape, generator=generator) * (k + 1)).to(dtype)
               for name, value in base.items()} for k in range(3)]
    base = {name: value.to(dtype) for name, value in base.items()}
    params = dict(base=base, density=0.3, trim_scope=trim_scope, weights=[1.0, 0.5, 2.0], progress=False)
    fused = merge("ties", models, **params).state_dict
    monkeypatch.setattr(native, "accepts", lambda job: False)
    plain = merge("ties", models, **params).state_dict
    for name in base:
        assert fused[name].dtype == dtype
        torch.testing.assert_close(fused[name].float(), plain[name].float(), rtol=1e-6, atol=1e-6)


# -- TIES per tensor in one pass, its sample and its order statistics -------------------------------------------
@pytest.mark.parametrize("parts", [1, 3])
def test_the_one_pass_merge_is_the_two_pass_merge_bit_for_bit(monkeypatch, parts):
    """Deferred positions (some |τ_i| inside its bracket) merged after the pass give exactly the two-pass result,
    in float32 and bfloat16, for every sign rule and merge function, split across threads or not."""
    monkeypatch.setattr(native, "SPLIT_AT", 1000)
    monkeypatch.setattr(native, "PARTS", parts)
    assert len(native._ranges(300_000)) == parts
    native._workers.cache_clear()  # a pool of `parts` threads, dropped again at the end
    try:
        _check_one_pass_against_two_passes()
    finally:
        native._workers.cache_clear()


def _check_one_pass_against_two_passes():
    for seed, (sign, merge_func, weights) in enumerate([("sum", "mean", None), ("count", "sum", [1.0, 0.5, 2.0]),
                                                       ("sum", "max", [2.0, 1.0, 1.0])]):
        job = random_job(positions=300_000, seed=10 + seed, weights=weights)
        for dtype in (torch.float32, torch.bfloat16):
            job.models, job.base = [m.to(dtype) for m in job.models], job.base.to(dtype)
            job.out_dtype = dtype
            over_changed = seed % 2 == 1
            job.params.update(density=0.2, sign=sign, merge_func=merge_func, scaling=0.7,
                              density_over="changed" if over_changed else "all")
            thresholds = _selection.tensor_thresholds(job, 0.2, over_changed)
            expected = native.ties_merge(job, thresholds, sign, 1.0, merge_func, 0.7)
            one_pass = ties._ties_in_one_pass(job)
            assert one_pass is not None, "the one-pass path fell back on an ordinary tensor"
            assert one_pass.dtype == dtype and torch.equal(one_pass.view(-1), expected.view(-1))


def test_the_one_pass_merge_defers_a_few_percent_and_falls_back_when_its_bracket_misses(monkeypatch):
    job = random_job(positions=200_000, seed=20)
    job.params.update(density=0.2, sign="sum", merge_func="mean", scaling=1.0, trim_scope="tensor", density_over="all",
                      rescale=False)
    passes = []
    real = native.ties_bracketed

    def recorded(*args, **kwargs):
        passes.append(real(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(native, "ties_bracketed", recorded)
    thresholds = _selection.tensor_thresholds(job, 0.2)
    expected = native.ties_merge(job, thresholds, "sum", 1.0, "mean", 1.0)
    assert torch.equal(ties._ties_in_one_pass(job), expected)
    deferred = sum(positions.numel() for _, positions, _ in passes[-1].deferred)
    assert 0 < deferred < 0.15 * job.base.numel()
    # brackets that hold no threshold: the pass's exact counts show it, and the two-pass merge runs instead
    monkeypatch.setattr(_selection, "bracket", lambda sample, kept: (10.0, 20.0))
    assert ties._ties_in_one_pass(job) is None
    assert torch.equal(ties._ties(job), expected)


def test_the_sample_reads_runs_of_positions_as_the_torch_path_does():
    job = random_job(positions=10_007, seed=21, weights=[1.0, 0.5, 2.0])
    job.models = [m.bfloat16() for m in job.models]
    for first, stride, run in ((0, 100, 32), (37, 64, 64), (9_990, 50, 32), (0, 1, 1)):
        sampled = native.ties_sample(job, first, stride, run)
        positions = [p for start in range(first, 10_007, stride) for p in range(start, min(start + run, 10_007))]
        expected = torch.stack([((m.float() - job.base) * w).abs()[positions]
                                for m, w in zip(job.models, [1.0, 0.5, 2.0])])
        assert torch.equal(sampled, expected)
        assert sampled.shape[1] == _selection.sample_runs(10_007, first, stride) * run - max(
            0, first + (_selection.sample_runs(10_007, first, stride) - 1) * stride + run - 10_007)


def test_radix_order_statistics_match_sorting_with_duplicates_and_nan():
    generator = torch.Generator().manual_seed(22)
    quantised = (torch.randint(0, 50, (100_000,), generator=generator).float() * 0.125)  # many equal values
    spread = torch.rand(70_001, generator=generator) * 1e-30 + torch.rand(70_001, generator=generator)
    with_nan = torch.cat([spread[:1000], torch.tensor([float("nan"), float("inf"), 0.0])])
    for values in (quantised, spread, with_nan):
        descending = values.sort(descending=True).values  # NaN first: the largest
        ranks = [1, 2, values.numel() // 3, values.numel() - 1, values.numel()]
        found = native.kth_largest(values, ranks)
        for rank, value in zip(ranks, found):
            expected = descending[rank - 1]
            assert (value != value and expected != expected) or value == float(expected)
        assert _selection.kth_largest(values.double(), ranks[2:3]) == [float(descending[ranks[2] - 1])]
    with pytest.raises(AssertionError, match="kth_largest"):
        native.kth_largest(spread, [0])


# -- DARE ------------------------------------------------------------------------------------------------------
def test_dare_masks_from_the_kernel_are_the_torch_draws():
    """One all-ones task vector, no rescale, scaling 1: the fused output is the base plus exactly the kept mask."""
    positions = 70_000
    job = job_of([torch.ones(positions)], torch.zeros(positions), seed=9, drop_rate=0.3, rescale=False,
                 combine="linear", scaling=1.0, weights=None)
    key = job.random_key(9, 0)
    fused = native.dare_merge(job, [key], _task_vectors.keep_from(0.3))
    draws = _task_vectors.uniform_draws(key, 0, positions)
    assert torch.equal(fused, (draws >= 0.3).float())
    assert torch.equal(_task_vectors.uniform_draws(key, 1234, 100), draws[1234:1334])  # any range on its own


def test_counter_draws_are_uniform_and_independent_across_keys():
    draws = _task_vectors.uniform_draws(12345, 0, 1 << 20)
    counts = torch.histc(draws, bins=16, min=0.0, max=1.0)
    expected = draws.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 60  # χ² with 15 dof: 60 is far in the tail
    other = _task_vectors.uniform_draws(12346, 0, 1 << 20)
    both_kept = float(((draws >= 0.5) & (other >= 0.5)).float().mean())
    assert abs(both_kept - 0.25) < 0.005


@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("rescale", [True, False, "l1"])
def test_fused_dare_matches_the_torch_path(monkeypatch, combine, rescale):
    job = random_job(positions=30_000, seed=10, weights=[1.0, 0.5, 2.0])
    job.params.update(seed=4, drop_rate=0.4, rescale=rescale, combine=combine, scaling=0.6, normalize=False)
    job.models = [model.bfloat16() for model in job.models]
    fused = dare._dare(job)
    monkeypatch.setattr(native, "accepts", lambda job: False)
    plain = dare._dare(job)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused, job.base)


def test_fused_dare_split_across_threads_gives_the_same_result(monkeypatch):
    job = random_job(positions=50_000, seed=11)
    job.params.update(seed=2, drop_rate=0.5, rescale="l1", combine="ties", scaling=1.0, normalize=False)
    keys = [job.random_key(2, i) for i in range(3)]
    whole = native.dare_merge(job, keys, 0.5)
    monkeypatch.setattr(native, "SPLIT_AT", 1000)
    monkeypatch.setattr(native, "PARTS", 3)
    native._workers.cache_clear()
    try:
        split = native.dare_merge(job, keys, 0.5)
    finally:
        native._workers.cache_clear()
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)  # the L1 sums add up in another order


# -- linear combinations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_combination_with_and_without_a_base_matches_torch(dtype):
    job = random_job(positions=40_000, seed=12)
    job.models = [model.to(dtype) for model in job.models]
    job.base = job.base.to(dtype)
    coefficients = [0.2, -0.5, 1.5]
    exact = job.upcast()
    with_base = exact.base + sum(c * (m - exact.base) for c, m in zip(coefficients, exact.models))
    without = sum(c * m for c, m in zip(coefficients, exact.models))
    torch.testing.assert_close(native.linear_combination(job, coefficients, with_base=True), with_base,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(native.linear_combination(job, coefficients, with_base=False), without,
                               rtol=1e-6, atol=1e-6)
    job.out_dtype = torch.bfloat16
    written = native.linear_combination(job, coefficients, with_base=False)
    assert written.dtype == torch.bfloat16
    torch.testing.assert_close(written, without.bfloat16(), rtol=0.01, atol=0.01)


@pytest.mark.parametrize("method, params", [("weighted_average", {"weights": [1.0, 2.0, 3.0]}),
                                            ("task_arithmetic", {"scaling": 0.4}),
                                            ("linear", {"t": 0.3}), ("linear", {"t": 0.8})])
def test_linear_family_merges_agree_with_and_without_the_kernels(monkeypatch, method, params):
    from nbmerge import merge

    generator = torch.Generator().manual_seed(5)
    base = {f"layers.{i}.mlp.up_proj.weight": torch.randn(64, 48, generator=generator).bfloat16()
            for i in range(2)}
    models = [{name: (value.float() + torch.randn(value.shape, generator=generator)).bfloat16()
               for name, value in base.items()} for _ in range(3 if method != "linear" else 1)]
    base_arg = None if method == "weighted_average" else base
    fused = merge(method, models, base=base_arg, progress=False, **params).state_dict
    monkeypatch.setattr(native, "accepts", lambda job, needs_base=True: False)
    plain = merge(method, models, base=base_arg, progress=False, **params).state_dict
    for name in base:
        assert fused[name].dtype == torch.bfloat16
        # the same float32 result up to rounding, then one bfloat16 rounding: at most one bfloat16 step apart
        torch.testing.assert_close(fused[name].float(), plain[name].float(), rtol=2 ** -7, atol=1e-6)


def test_dot_and_norms_in_double_match_float64():
    job = random_job(positions=70_000, seed=13)
    first, second = job.models[0].bfloat16(), job.models[1]
    norm_a, norm_b, dot = native.dot_and_norms(first, second)
    a, b = first.double(), second.double()
    assert norm_a == pytest.approx(float(a.norm()), rel=1e-9)
    assert norm_b == pytest.approx(float(b.norm()), rel=1e-9)
    assert dot == pytest.approx(float(a @ b), rel=1e-9)


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_slerp_agrees_with_and_without_the_kernels(monkeypatch, t):
    from nbmerge import merge

    generator = torch.Generator().manual_seed(6)
    base = {"layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=generator).bfloat16(),
            "layers.0.input_layernorm.weight": torch.ones(48).bfloat16()}   # parallel endpoints: lerp
    model = {name: (value.float() + 0.5 * torch.randn(value.shape, generator=generator)).bfloat16()
             if "mlp" in name else value * 1.5 for name, value in base.items()}
    fused = merge("slerp", [model], base=base, t=t, progress=False).state_dict
    monkeypatch.setattr(native, "accepts", lambda job, needs_base=True: False)
    plain = merge("slerp", [model], base=base, t=t, progress=False).state_dict
    for name in base:
        torch.testing.assert_close(fused[name].float(), plain[name].float(), rtol=2 ** -7, atol=1e-6)
    assert not torch.equal(fused["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])
