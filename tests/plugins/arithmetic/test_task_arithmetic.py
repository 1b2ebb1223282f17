"""task arithmetic θ_0 + λ Σ w_i τ_i."""

from __future__ import annotations

from method_cases import assert_matches, decoder_state, f64, fine_tuned, merge


def test_task_arithmetic_default_scaling_is_0_3():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2)]
    merged = merge("task_arithmetic", models, base=base)
    for name in base:
        expected = f64(base[name]) + 0.3 * sum(f64(m[name]) - f64(base[name]) for m in models)
        assert_matches(merged[name], expected, name=name)


def test_task_arithmetic_scaling_and_weights():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2, 3)]
    weights = [1.0, -0.5, 2.0]
    merged = merge("task_arithmetic", models, base=base, scaling=0.7, weights=weights)
    for name in base:
        task_sum = sum(w * (f64(m[name]) - f64(base[name])) for w, m in zip(weights, models))
        assert_matches(merged[name], f64(base[name]) + 0.7 * task_sum, name=name)
