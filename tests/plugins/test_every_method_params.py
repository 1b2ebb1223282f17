"""Every method's parameters are checked before any tensor is read, and errors name the parameter."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from method_cases import merge

from nbmerge import ParameterError


class Unreadable(Mapping):
    """A model that fails the test as soon as anything looks inside it."""

    def __getitem__(self, key):
        raise AssertionError("a model was read before the parameters were validated")

    def __iter__(self):
        raise AssertionError("a model was read before the parameters were validated")

    def __len__(self):
        raise AssertionError("a model was read before the parameters were validated")


@pytest.mark.parametrize("method, n_models, params, message", [
    ("ties", 2, {"density": 1.5}, "density"),
    ("ties", 2, {"density": 0.0}, "density"),
    ("dare", 2, {"drop_rate": 1.0}, "drop_rate"),
    ("dare", 2, {"drop_rate": -0.1}, "drop_rate"),
    ("ties", 2, {"densty": 0.5}, "did you mean 'density'"),
    ("ties", 2, {"sign": "mass"}, "sign"),
    ("ties", 2, {"merge_func": "median"}, "merge_func"),
    ("ties", 2, {"trim_scope": "layer"}, "trim_scope"),
    ("dare", 2, {"rescale": "l2"}, "rescale"),
    ("task_arithmetic", 2, {"weights": [1.0, 2.0, 3.0]}, "weights"),
    ("ties", 3, {"weights": [1.0, 2.0]}, "weights"),
    ("expo", 1, {"fix_first_n_layers": "third"}, "fix_first_n_layers"),
    ("expo", 1, {"magnitude_sparsity_ratio": 1.0}, "magnitude_sparsity_ratio"),
    ("linear", 2, {"t": 1.5}, "'t'"),
    ("tall_mask", 2, {"task": 2}, "'task' is 2, but there are 2 models"),
    ("tall_mask", 3, {"tall_mask_lambda": [0.5, 0.6]}, "tall_mask_lambda"),
    ("wudi", 2, {"iterations": -1}, "iterations"),
    ("wudi", 2, {"matrices": "embeddings"}, "matrices"),
    ("doge_ta", 2, {"density": 0.0}, "density"),
    ("doge_ta", 2, {"subspace": 0}, "subspace"),
    ("doge_ta", 2, {"density": [0.1, 0.5]}, "density"),
    ("magmax", 2, {"scale": 0.5}, "did you mean 'scaling'"),
    ("tsv_m", 3, {"weights": [1.0, 2.0]}, "weights"),
    ("iso_cts", 2, {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("iso_c", 2, {"scaling": "big"}, "scaling"),
])
def test_invalid_parameters_are_rejected_before_reading_tensors(method, n_models, params, message):
    with pytest.raises(ParameterError, match=message):
        merge(method, [Unreadable() for _ in range(n_models)], base=Unreadable(), **params)


def test_wrong_number_of_weights_for_weighted_average():
    with pytest.raises(ParameterError, match="'weights' has 3 values for 2 models"):
        merge("weighted_average", [Unreadable(), Unreadable()], weights=[1.0, 2.0, 3.0])


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(ParameterError, match="did you mean 'slerp'"):
        merge("slerpp", [Unreadable(), Unreadable()])
    with pytest.raises(ParameterError, match="did you mean 'task_arithmetic'"):
        merge("task_arithmetc", [Unreadable()], base=Unreadable())


@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_interpolations_take_exactly_two_endpoints(method):
    with pytest.raises(ParameterError, match=method):
        merge(method, [Unreadable(), Unreadable(), Unreadable()])
    with pytest.raises(ParameterError, match=method):
        merge(method, [Unreadable(), Unreadable()], base=Unreadable())


def test_methods_that_need_a_base_say_so():
    for method in ("task_arithmetic", "ties", "dare", "expo", "magmax", "tall_mask", "wudi", "doge_ta"):
        with pytest.raises(ParameterError, match="base"):
            merge(method, [Unreadable(), Unreadable()])
