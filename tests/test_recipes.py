"""Recipe parsing: mergekit's names and defaults map onto nbmerge's methods and parameters; what cannot map is an
error that says so. (That the mapped merges equal mergekit's results is checked in test_magics.)"""

from __future__ import annotations

import pytest

from nbmerge.recipes import RecipeError, check_layer_range, parse_recipe


def mergekit(method: str, models: str, extra: str = "") -> str:
    return f"merge_method: {method}\nbase_model: b\n{extra}\nmodels:\n{models}"


TWO = "  - model: x\n    parameters: {weight: 1}\n  - model: y\n    parameters: {weight: 3}\n"


@pytest.mark.parametrize("method, extra, expected_method, expected", [
    # mergekit's linear averages base_model too, with the top-level (default) weight
    ("linear", "parameters: {weight: 2}", "weighted_average", {"weights": [1.0, 3.0, 2.0], "normalize": True}),
    ("task_arithmetic", "", "task_arithmetic", {"weights": [1.0, 3.0], "scaling": 1.0}),
    ("task_arithmetic", "parameters: {normalize: true, lambda: 0.5}", "task_arithmetic",
     {"weights": [0.25, 0.75], "scaling": 0.5}),
    ("ties", "parameters: {density: 0.5}", "ties", {"weights": [1.0, 3.0], "scaling": 1.0, "density": 0.5, "trim_scope": "tensor",
                          "sign": "sum", "merge_func": "mean"}),
    ("ties", "parameters: {normalize: false, density: 0.5}", "ties", {"weights": [1.0, 3.0], "scaling": 1.0, "density": 0.5,
                                                        "trim_scope": "tensor", "sign": "sum", "merge_func": "sum"}),
    ("dare_linear", "parameters: {density: 0.5}", "dare", {"weights": [1.0, 3.0], "scaling": 1.0, "drop_rate": 0.5, "rescale": "l1",
                                 "combine": "linear"}),
    ("dare_ties", "parameters: {rescale: false, density: 0.5}", "dare", {"weights": [1.0, 3.0], "scaling": 1.0, "drop_rate": 0.5,
                                                           "rescale": False, "combine": "ties"}),
])
def test_mergekit_methods_map_with_mergekits_defaults(method, extra, expected_method, expected):
    call = parse_recipe(mergekit(method, TWO, extra))
    assert (call.method, call.params, call.source) == (expected_method, expected, "mergekit")
    assert call.models == ({"x": "x", "y": "y", "b": "b"} if method == "linear" else {"x": "x", "y": "y"})
    assert call.base == (None if method == "linear" else "b")


def test_top_level_parameters_are_per_model_defaults_and_dtype_is_the_output_dtype():
    call = parse_recipe(mergekit("ties", "  - model: x\n  - model: y\n    parameters: {weight: 2}\n",
                                 "parameters: {density: 0.3, weight: 0.5}\ndtype: bfloat16"))
    assert call.params["density"] == 0.3 and call.params["weights"] == [0.5, 2.0]
    assert call.options == {"out_dtype": "bfloat16"}


def test_slerp_takes_the_base_as_first_endpoint_and_a_slice_range():
    call = parse_recipe("merge_method: slerp\nbase_model: a\nparameters: {t: [0, 1]}\nslices:\n  - sources:\n"
                        "    - {model: a, layer_range: [0, 8]}\n    - {model: b, layer_range: [0, 8]}\n")
    assert (call.method, call.models, call.base, call.params, call.layer_range) == \
        ("slerp", {"b": "b"}, "a", {"t": [0, 1]}, (0, 8))
    check_layer_range(call, lambda: {"b": 8})
    with pytest.raises(RecipeError, match=r"layer_range \[0, 8\] covers only part of b's 16 layers"):
        check_layer_range(call, lambda: {"b": 16})


def test_nbmerge_spelling_is_the_api_keywords():
    call = parse_recipe("method: dare\nmodels: {math: m.safetensors, code: c/}\nbase: b/\n"
                        "params: {drop_rate: 0.9}\nout_dtype: float16\nnbmerge_version: 0.1.0\nplugin: dare\n")
    assert (call.method, call.models, call.base, call.params, call.options) == \
        ("dare", {"math": "m.safetensors", "code": "c/"}, "b/", {"drop_rate": 0.9}, {"out_dtype": "float16"})


@pytest.mark.parametrize("text, message", [
    ("merge_method: arcee_fusion\nmodels: [x]", "merge_method 'arcee_fusion' is not supported; nbmerge maps linear, "),
    ("merge_method: ties\nmodels: [x]\ntokenizer: {source: union}", "'tokenizer' is not supported"),
    ("merge_method: ties\nbase_model: b\nmodels: [x]\ntokenizer_source: y", "tokenizer_source 'y' names none"),
    ("merge_method: ties\nslices: [{sources: [x]}, {sources: [y]}]", "2 slices stitch layers"),
    ("merge_method: ties\nslices: [{sources: [{model: x, layer_range: [0, 2]}, {model: y, layer_range: [2, 4]}]}]",
     "the same layer_range"),
    (mergekit("dare_ties", "  - model: x\n    parameters: {density: high}\n"), "dare_ties: density must be a number"),
    (mergekit("ties", "  - model: x\n    parameters: {weight: [{filter: mlp, value: 1}]}\n"),
     "ties parameter 'weight' of model 'x': every entry has a filter"),
    (mergekit("ties", "  - model: x\n    parameters: {weight: [{filter: mlp, vlaue: 1}]}\n"),
     "each entry must be {filter: ..., value: ...}"),
    (mergekit("ties", "  - model: x\n    parameters: {epsilon: 0.1}\n"), "unknown key 'epsilon'"),
    (mergekit("ties", TWO, "parameters: {lamda: 2}"), "unknown key 'lamda'; did you mean 'lambda'?"),
    (mergekit("dare_ties", TWO, "parameters: {normalize: true}"), "dare_ties with normalize: true"),
    (mergekit("ties", "  - model: x\n  - model: y\n    parameters: {weight: 2}\n"), "every model a weight or none"),
    (mergekit("linear", TWO), "every model a weight or none (mergekit linear"),
    ("merge_method: slerp\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}", "needs base_model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]", "interpolates two models"),
    ("method: ties\nmodel: [x]", "unknown key 'model'; did you mean 'models'?"),
    ("method: ties\nmodels: x", "'models' must be a list"),
    ("method: ties\nmodels: {}", "'models' must be a list"),  # found by tests/io/test_fuzz.py
    ("models: [x]", "say which method to use"),
    ("- just\n- a list", "expected a mapping"),
    ("method: ties\n  models: [x", "not valid YAML at line 2"),
])
def test_what_cannot_map_is_named(text, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(text)
    assert message in str(error.value)
