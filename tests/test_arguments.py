"""Arguments generated from Param declarations: one flag per parameter, shared by the CLI and the magics."""

from __future__ import annotations

import pytest

from nbmerge.arguments import flag, method_parser, params_from_args, unknown_flag_message
from nbmerge.plugins import all_methods, get_method


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_declared_parameter_has_its_flag(name):
    method = get_method(name)
    parser = method_parser(method, f"nbmerge merge {name}", "models")
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {flag(p.name) for p in method.params} <= flags
    assert {"--base", "--out", "--device", "--out-dtype", "--shard-size", "--overwrite", "--quiet"} <= flags
    shown = " ".join(parser.format_help().split())  # --help: a help text is plain text ("30 %" is no format)
    assert all(" ".join(p.help.split()) in shown for p in method.params)


def test_given_flags_become_params_as_text():
    method = get_method("ties")
    args = method_parser(method, "p", "models").parse_args(["a", "b", "--density", "0.3", "--trim-scope", "tensor"])
    assert args.models == ["a", "b"]
    assert params_from_args(method, args) == {"density": "0.3", "trim_scope": "tensor"}
    assert method.validate(params_from_args(method, args), 2, True)["density"] == 0.3


def test_unknown_flag_names_the_closest_parameter():
    method = get_method("dare")
    assert unknown_flag_message(method, ["--drop-rat", "0.3"]) == (
        "dare: unknown parameter --drop-rat; did you mean --drop-rate? (valid parameters: drop_rate, rescale, seed, "
        "combine, scaling, weights, normalize)")
    assert unknown_flag_message(method, ["stray"]) == "dare: unexpected arguments stray"
