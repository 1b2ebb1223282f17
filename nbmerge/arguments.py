"""Command-line style arguments of a merge, generated from the method's declaration: the CLI and the magics share them.

``method_parser(method, prog, models_help)`` builds the parser (``--base``, ``--out``, ``--device``, ... and one
``--<param>`` flag per declared ``Param``); ``params_from_args`` collects the parameters the user gave.
``mergekit_parser`` / ``mergekit_values`` do the same for a mergekit method name (``nbmerge.method_names``).
"""

from __future__ import annotations

import argparse

from nbmerge.method.params import unknown_parameter_message


def flag(param_name: str) -> str:
    """The flag of a parameter: ``trim_scope`` -> ``--trim-scope``."""
    return "--" + param_name.replace("_", "-")


def method_parser(method, prog: str, models_help: str,
                  parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(prog=prog, description=f"{method.summary}. {method.formula}")
    _merge_arguments(parser, models_help)
    if method.build_module is not None:
        parser.add_argument("--pool", required=True, help="the registered task pool whose tasks the models are "
                            "named after (model folder name = task name), e.g. minilm-tiny")
        parser.add_argument("--split", default="test", help="the split whose unlabeled inputs adapt the model")
    group = parser.add_argument_group(f"{method.name} parameters")
    for param in method.params:
        text = param.help
        if param.range_text():
            text += f"; {param.range_text()}"
        help_text = f"{text} (default: {param.plain(param.default)})"
        group.add_argument(flag(param.name), dest=f"param_{param.name}", metavar="VALUE",
                           help=help_text.replace("%", "%%"))  # plain text, not an argparse format string
    return parser


def mergekit_parser(name: str, prog: str, models_help: str,
                    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of mergekit's method ``name`` (``nbmerge.method_names``): the common ones, ``--dtype`` (the
    compute dtype) and one per mergekit parameter, read by ``mergekit_values``."""
    from nbmerge.method_names import mergekit_equivalent, mergekit_flags
    from nbmerge.recipes import MERGEKIT

    parser = parser_class(prog=prog, description=f"mergekit's {name}, run as {mergekit_equivalent(name)} with "
                          f"mergekit's parameters and defaults (as a recipe with merge_method: {name})")
    _merge_arguments(parser, models_help)
    parser.add_argument("--dtype", help="mergekit's dtype, as in its recipe: the dtype the arithmetic runs in "
                        "where nbmerge has the method's mergekit arithmetic (default: the inputs' own), else the "
                        "output dtype unless --out-dtype is given")
    group = parser.add_argument_group(f"mergekit {name} parameters (per-model ones: one value, or one per model "
                                      f"separated by commas)")
    spec = MERGEKIT[name]
    for key in mergekit_flags(spec):
        default = {**spec.shared, **spec.per_model}.get(key)
        text = "nbmerge's spelling of weight" if key == "weights" else f"mergekit's {key}"
        group.add_argument(flag(key), dest=f"mergekit_{key}", metavar="VALUE",
                           help=text + ("" if default is None else f" (default: {default})"))
    return parser


def recipe_parser(prog: str, description: str,
                  parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of a merge by recipe (``nbmerge merge --recipe``, ``%%merge``): where it goes and what the caller
    allows, which a recipe never chooses itself."""
    parser = parser_class(prog=prog, description=description)
    parser.add_argument("--out", help="output folder or .safetensors file (a recipe never chooses it)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--allow-nonfinite", action="store_true", help="merge inputs holding NaN or Inf")
    parser.add_argument("--allow-config-mismatch", action="store_true",
                        help="merge models whose config.json files disagree on the architecture")
    parser.add_argument("--intermediate-dir", help="a chain of merges (several YAML documents): keep each named "
                        "merge in DIR/<name> (by default a temporary folder beside the output, removed after)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def mergekit_values(args: argparse.Namespace) -> dict:
    """The mergekit parameters given on the command line (name -> text)."""
    return {key.removeprefix("mergekit_"): value for key, value in vars(args).items()
            if key.startswith("mergekit_") and value is not None}


def _merge_arguments(parser: argparse.ArgumentParser, models_help: str) -> None:
    parser.add_argument("models", nargs="+", help=models_help)
    parser.add_argument("--base", help="the base (pretrained) model")
    parser.add_argument("--out", help="output folder, or a .safetensors file (default: merge in memory)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--out-dtype", help="store the merged tensors in this dtype (default: the inputs')")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="merge inputs holding NaN or Inf (refused by default)")
    parser.add_argument("--allow-config-mismatch", action="store_true",
                        help="merge models whose config.json files disagree on the architecture (refused by "
                             "default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def params_from_args(method, args: argparse.Namespace) -> dict:
    """The method parameters given on the command line, as text for ``Param.check`` to parse."""
    return {p.name: getattr(args, f"param_{p.name}") for p in method.params
            if getattr(args, f"param_{p.name}") is not None}


def unknown_flag_message(method, unknown: list[str]) -> str:
    """Say which flag is not a parameter of ``method`` and suggest the closest one."""
    flags = [a for a in unknown if a.startswith("-")]
    if not flags:
        return f"{method.name}: unexpected arguments {' '.join(unknown)}"
    name = flags[0].lstrip("-").split("=")[0].replace("-", "_")
    valid = [p.name for p in method.params]
    message = unknown_parameter_message(method.name, name, valid)
    for candidate in [name, *valid]:
        message = message.replace(repr(candidate), flag(candidate))
    return message
