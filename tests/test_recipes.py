"""Recipe parsing: mergekit's names and defaults map onto nbmerge's methods and parameters; what cannot map is an
error that says so. (That the mapped merges equal mergekit's results is checked in test_magics.)"""

from __future__ import annotations

import pytest

from nbmerge.recipes import RecipeError, parse_recipe


def mergekit(method: str, models: str, extra: str = "") -> str:
    return f"merge_method: {method}\nbase_model: b\n{extra}\nmodels:\n{models}"


TWO = "  - model: x\n    parameters: {weight: 1}\n  - model: y\n    parameters: {weight: 3}\n"


@pytest.mark.parametrize("method, extra, expected_method, expected", [
    # mergekit's linear averages base_model too, with the top-level (default) weight
    ("linear", "parameters: {weight: 2}", "weighted_average", {"weights": [1.0, 3.0, 2.0], "normalize": True}),
    ("task_arithmetic", "", "task_arithmetic", {"weights": [1.0, 3.0], "scaling": 1.0, "normalize": False}),
    ("task_arithmetic", "parameters: {normalize: true, lambda: 0.5}", "task_arithmetic",
     {"weights": [1.0, 3.0], "scaling": 0.5, "normalize": True}),
    ("ties", "parameters: {density: 0.5}", "ties", {"weights": [1.0, 3.0], "scaling": 1.0, "density": 0.5, "trim_scope": "tensor",
                          "sign": "sum", "merge_func": "mean", "rescale": False}),
    ("ties", "parameters: {normalize: false, density: 0.5, rescale: true}", "ties",
     {"weights": [1.0, 3.0], "scaling": 1.0, "density": 0.5, "trim_scope": "tensor", "sign": "sum", "merge_func": "sum",
      "rescale": True}),
    ("dare_linear", "parameters: {density: 0.5}", "dare", {"weights": [1.0, 3.0], "scaling": 1.0, "drop_rate": 0.5, "rescale": "l1",
                                 "combine": "linear", "normalize": False}),
    ("dare_ties", "parameters: {rescale: false, density: 0.5}", "dare", {"weights": [1.0, 3.0], "scaling": 1.0, "drop_rate": 0.5,
                                                           "rescale": False, "combine": "ties",
                                                           "normalize": False}),
])
def test_mergekit_methods_map_with_mergekits_defaults(method, extra, expected_method, expected):
    call = parse_recipe(mergekit(method, TWO, extra))
    assert (call.method, call.params, call.source) == (expected_method, expected, "mergekit")
    assert call.models == ({"x": "x", "y": "y", "b": "b"} if method == "linear" else {"x": "x", "y": "y"})
    assert call.base == (None if method == "linear" else "b")


def test_top_level_parameters_are_per_model_defaults_and_dtype_is_the_compute_dtype():
    call = parse_recipe(mergekit("ties", "  - model: x\n  - model: y\n    parameters: {weight: 2}\n",
                                 "parameters: {density: 0.3, weight: 0.5}\ndtype: bfloat16"))
    assert call.params["density"] == 0.3 and call.params["weights"] == [0.5, 2.0]
    assert call.options == {"compute_dtype": "bfloat16"}  # mergekit 0.1.5: the dtype its arithmetic runs in


@pytest.mark.parametrize("method, extra, expected", [
    ("ties", "dtype: float32\nout_dtype: bfloat16", {"compute_dtype": "float32", "out_dtype": "bfloat16"}),
    ("ties", "", {"compute_dtype": "inputs"}),  # no dtype: mergekit computes in the inputs' own dtype
    ("dare_ties", "dtype: bfloat16", {"out_dtype": "bfloat16"}),  # random masks: nbmerge's float32 arithmetic
    ("dare_ties", "dtype: bfloat16\nout_dtype: float16", {"out_dtype": "float16"}),
])
def test_dtype_and_out_dtype_mean_what_they_mean_in_mergekit(method, extra, expected):
    assert parse_recipe(mergekit(method, TWO, extra)).options == expected


def test_slerp_takes_the_base_as_first_endpoint_and_a_slice_range():
    call = parse_recipe("merge_method: slerp\nbase_model: a\nparameters: {t: [0, 1]}\nslices:\n  - sources:\n"
                        "    - {model: a, layer_range: [0, 8]}\n    - {model: b, layer_range: [0, 8]}\n")
    assert (call.method, call.models, call.base, call.params, call.layer_range) == \
        ("slerp", {"b": "b"}, "a", {"t": [0, 1]}, (0, 8))
    assert call.slices is None  # run_recipe merges it plainly where [0, 8] is every layer, else stacks one slice


def test_several_slices_are_a_layer_stack_of_per_slice_merges():
    call = parse_recipe("merge_method: slerp\nbase_model: a\nparameters: {t: 0.3}\nslices:\n"
                        "  - sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 4]}]\n"
                        "  - sources: [{model: a, layer_range: [2, 6]}, {model: b, layer_range: [4, 8]}]\n"
                        "    parameters: {t: 0.9}\n")
    assert call.method == "stack" and len(call.slices) == 2
    first, second = call.slices
    assert (first.method, first.models, first.layers, first.base, first.base_layers, first.params) == \
        ("slerp", {"b": "b"}, {"b": (0, 4)}, "a", (0, 4), {"t": 0.3})
    assert (second.layers, second.base_layers, second.params) == ({"b": (4, 8)}, (2, 6), {"t": 0.9})


def test_a_self_merge_labels_two_ranges_of_one_model_apart():
    call = parse_recipe("merge_method: passthrough\nslices:\n  - sources: [{model: m, layer_range: [0, 3]}]\n"
                        "  - sources: [{model: m, layer_range: [1, 4]}]\n"
                        "  - sources: [{model: n, layer_range: [2, 4], parameters: {scale: 0.5}}]\n")
    assert [(piece.method, piece.models, piece.layers, piece.params) for piece in call.slices] == [
        ("passthrough", {"m": "m"}, {"m": (0, 3)}, {"scale": 1.0}),
        ("passthrough", {"m": "m"}, {"m": (1, 4)}, {"scale": 1.0}),
        ("passthrough", {"n": "n"}, {"n": (2, 4)}, {"scale": 0.5})]


def test_nbmerge_spelling_of_a_stack_is_what_stack_records():
    call = parse_recipe("slices:\n  - {models: [m], layers: [0, 2]}\n"
                        "  - {method: linear, models: {a: m, b: n}, layers: {a: [2, 4], b: [0, 2]}, params: {t: 0.2}}\n"
                        "out_dtype: bfloat16\n")
    assert call.method == "stack" and call.options == {"out_dtype": "bfloat16"}
    assert [(p.method, p.models, p.layers, p.params) for p in call.slices] == [
        ("passthrough", {"m": "m"}, {"m": (0, 2)}, {}),
        ("linear", {"a": "m", "b": "n"}, {"a": (2, 4), "b": (0, 2)}, {"t": 0.2})]


def test_nbmerge_spelling_is_the_api_keywords():
    call = parse_recipe("method: dare\nmodels: {math: m.safetensors, code: c/}\nbase: b/\n"
                        "params: {drop_rate: 0.9}\nout_dtype: float16\nnbmerge_version: 0.1.0\nplugin: dare\n")
    assert (call.method, call.models, call.base, call.params, call.options) == \
        ("dare", {"math": "m.safetensors", "code": "c/"}, "b/", {"drop_rate": 0.9}, {"out_dtype": "float16"})


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: true",
     "recipe: parameters must be a mapping of parameter names to values, got True"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: [[]]}]",
     "recipe: parameters of model 'x' must be a mapping"),
    ("merge_method: passthrough\nslices: [{sources: [{model: x, layer_range: [0, 2]}], parameters: [1]}]",
     "recipe: slices[0].parameters must be a mapping"),
    ("merge_method: rem\nmodels: [x]", "merge_method 'rem' is not supported; nbmerge maps linear, "),
    ("merge_method: ties\nbase_model: b\nmodels: [x]\nchat_template: exaone",
     "chat_template 'exaone' is not one of nbmerge's built-in"),
    ("merge_method: ties\nbase_model: b\nmodels: [x]\ntokenizer: {source: union, tokens: {}}",
     "tokenizer.tokens is not supported"),
    ("merge_method: ties\nbase_model: b\nmodels: [x]\ntokenizer: {source: b}\ntokenizer_source: b", "not both"),
    ("merge_method: ties\nbase_model: b\nmodels: [x]\ntokenizer: {source: b, pad_to_multiple_of: 0}",
     "tokenizer.pad_to_multiple_of must be a positive integer, got 0"),
    ("merge_method: ties\nslices: [{sources: [x]}, {sources: [y]}]", "slices[0].sources[0] layer_range must be [start, end]"),
    ("merge_method: ties\nslices: [{sources: [{model: x, layer_range: [2, 2]}]}]", "must be [start, end] with 0 <= start < end, got [2, 2]"),
    ("merge_method: ties\nbase_model: b\nslices: [{sources: [{model: x, layer_range: [0, 2]}]}, "
     "{sources: [{model: y, layer_range: [2, 4]}]}]", "slices[0]: ties needs base_model 'b' among the slice's"),
    ("merge_method: passthrough\nslices: [{sources: [{model: x, layer_range: [0, 2]}], weight: 1}]",
     "slices[0]: unknown key 'weight'"),
    (mergekit("dare_ties", "  - model: x\n    parameters: {density: high}\n"), "dare_ties: density must be a number"),
    (mergekit("ties", "  - model: x\n    parameters: {weight: [{filter: mlp, value: 1}]}\n"),
     "ties parameter 'weight' of model 'x': every entry has a filter"),
    (mergekit("ties", "  - model: x\n    parameters: {weight: [{filter: mlp, vlaue: 1}]}\n"),
     "each entry must be {filter: ..., value: ...}"),
    (mergekit("ties", "  - model: x\n    parameters: {epsilon: 0.1}\n"), "unknown key 'epsilon'"),
    (mergekit("ties", TWO, "parameters: {lamda: 2}"), "unknown key 'lamda'; did you mean 'lambda'?"),
    (mergekit("model_stock", "  - model: x\n    parameters: {weight: 1}\n"),
     "model_stock parameters of model 'x': unknown key 'weight' (it takes none)"),
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
