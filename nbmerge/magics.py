"""IPython magics: ``%merge``, ``%%merge`` (YAML recipes), ``%merge_methods``.

``%merge METHOD MODEL... [--base B] [--out DIR] [--<param> V]... [-o VAR]`` takes the CLI's arguments, generated
from the method's parameter declaration (``nbmerge.arguments``). A model is a notebook variable (state dict,
nn.Module, MergeResult, path, or a list of those) or a path. User mistakes raise a one-line ``UsageError``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Mapping

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

MAGIC_NAMES = ("merge", "merge_methods")

USAGE = """Merge models with any registered method, from a line or from a YAML recipe.

Line:   %merge METHOD MODEL... [--base B] [--out DIR] [--PARAM VALUE]... [-o VAR]
Cell:   %%merge [-o VAR] [--out DIR] [--device D] [--overwrite] [--quiet]
        <YAML recipe: mergekit's format (merge_method, models, base_model, parameters, dtype, slices)
         or nbmerge's (method, models, base, params, out_dtype)>

MODEL and B are notebook variables (state dicts, nn.Modules, MergeResults, paths, or lists of them) or paths to
.safetensors files / Hugging Face folders. `{expr}` and `$name` expand in the line. The MergeResult lands in VAR
(`-o VAR`), or is the cell's value. `%merge METHOD --help` shows one method's flags; `%merge_methods` the table.

Common flags: --base B, --out DIR (default: merge in memory), --device cpu|cuda|auto, --out-dtype DTYPE,
--shard-size 5GB, --overwrite, --quiet (no progress bar), -o/--var VAR.
"""


class _Done(Exception):
    """argparse finished early (``--help`` printed)."""


class _MagicParser(argparse.ArgumentParser):
    """argparse whose mistakes become one-line UsageErrors instead of SystemExit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None):
        if status:
            raise UsageError(f"{self.prog}: {message or 'invalid arguments'}")
        raise _Done


def one_line(message) -> str:
    """An error message on one line, in the magic's spelling (``--base B`` rather than the API's ``base=...``)."""
    return " ".join(str(message).split()).replace("pass base=...", "pass --base B").replace("drop base=...",
                                                                                           "drop --base")


def method_help() -> str:
    """The magic's help with every registered method and its parameters (built when asked, so plugins show)."""
    from .display import MethodTable
    from .registry import all_methods, plugin_versions

    return USAGE + "\nRegistered methods:\n" + str(MethodTable(all_methods().values(), plugin_versions()))


@magics_class
class MergeMagics(Magics):
    """The nbmerge magics; ``%load_ext nbmerge`` registers them (``import nbmerge`` registers them lazily)."""

    @line_cell_magic
    def merge(self, line: str, cell: str | None = None):
        if cell is None:
            return self._merge_line(line)
        return self._merge_recipe(line, cell)

    merge.getdoc = method_help  # IPython's `%merge?` calls getdoc(): the help lists the methods registered now

    @line_magic
    def merge_methods(self, line: str):
        """Show every registered merge method: plugin and version, models, base, parameters with ranges."""
        from .display import MethodTable
        from .registry import all_methods, plugin_versions

        names = line.split()
        methods = all_methods()
        for name in names:
            self._method(name)
        chosen = [methods[name] for name in names] if names else list(methods.values())
        return MethodTable(chosen, plugin_versions())

    # -- %merge ------------------------------------------------------------------------------------------------
    def _merge_line(self, line: str):
        from .arguments import method_parser, params_from_args, unknown_flag_message

        words = _split(line)
        if not words or words[0].startswith("-"):
            raise UsageError("%merge: give a method and models, e.g. %merge ties ft_a ft_b --base base -o merged "
                             "(see %merge? and %merge_methods)")
        method = self._method(words[0])
        parser = method_parser(method, f"%merge {method.name}", "models: notebook variables or paths",
                               parser_class=_MagicParser)
        parser.add_argument("-o", "--var", help="store the MergeResult in this notebook variable")
        try:
            args, unknown = parser.parse_known_args(words[1:])
        except _Done:
            return None
        if unknown:
            raise UsageError(one_line(unknown_flag_message(method, unknown)))
        models = self._models(args.models)
        base = None if args.base is None else self._model(args.base)
        options = dict(out=args.out, device=args.device, out_dtype=args.out_dtype, shard_size=args.shard_size,
                       overwrite=args.overwrite)
        return self._run(method.name, models, base, options, params_from_args(method, args), args.var, args.quiet)

    # -- %%merge -----------------------------------------------------------------------------------------------
    def _merge_recipe(self, line: str, cell: str):
        from .errors import NBMergeError
        from .recipes import check_layer_range, parse_recipe

        parser = _MagicParser(prog="%%merge", description="merge with the YAML recipe in the cell body")
        parser.add_argument("-o", "--var", help="store the MergeResult in this notebook variable")
        parser.add_argument("--out", help="output folder or .safetensors file (overrides the recipe's)")
        parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        try:
            args = parser.parse_args(_split(line))
        except _Done:
            return None
        try:
            call = parse_recipe(cell)
        except NBMergeError as exc:
            raise UsageError(one_line(exc)) from None
        self._method(call.method)
        models = {}
        for label, reference in call.models.items():
            _add_model(models, label, self._model(reference))
        base = None if call.base is None else self._model(call.base)
        try:
            check_layer_range(call, lambda: _layer_counts(models))
        except NBMergeError as exc:
            raise UsageError(one_line(exc)) from None
        options = dict(call.options)
        for key in ("out", "device"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        if args.overwrite:
            options["overwrite"] = True
        return self._run(call.method, models, base, options, call.params, args.var, args.quiet)

    # -- shared ------------------------------------------------------------------------------------------------
    def _run(self, method: str, models: dict, base: Any, options: dict, params: dict, var: str | None,
             quiet: bool):
        from .api import merge
        from .display import ProgressDisplay, merge_summary
        from .errors import NBMergeError

        if var is not None and not var.isidentifier():
            raise UsageError(f"-o {var}: not a valid variable name")
        # in a kernel: a widget bar that the summary replaces; in a terminal: tqdm's text bar
        bar = ProgressDisplay(f"nbmerge {method}") if not quiet and _in_kernel(self.shell) else None
        summary = ""
        try:
            result = merge(method, models, base=base, progress=not quiet and bar is None,
                           on_progress=None if bar is None else bar.on_progress, **options, **params)
            summary = merge_summary(result, var)
        except NBMergeError as exc:
            raise UsageError(one_line(exc)) from None
        except KeyboardInterrupt:
            summary = "nbmerge: interrupted; nothing was written"
            raise
        finally:
            if bar is not None:
                bar.finish(summary)
        if var is None:
            return result
        self.shell.user_ns[var] = result
        if bar is None:
            print(summary)
        return None

    def _method(self, name: str):
        from .errors import NBMergeError
        from .registry import get_method

        try:
            return get_method(name)
        except NBMergeError as exc:
            raise UsageError(one_line(exc) + "; %merge_methods lists them") from None

    def _models(self, references: list[str]) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for reference in references:
            value = self._model(reference, allow_list=True)
            if isinstance(value, list):
                for index, item in enumerate(value):
                    _add_model(models, f"{reference}[{index}]", item)
            else:
                _add_model(models, reference, value)
        return models

    def _model(self, reference: str, allow_list: bool = False) -> Any:
        """A notebook variable of that name, else an existing path; a UsageError says what to do otherwise."""
        namespace = self.shell.user_ns
        if reference.isidentifier() and reference in namespace:
            return model_input(namespace[reference], reference, allow_list)
        path = Path(reference).expanduser()
        if path.exists():
            return path
        raise UsageError(f"model {reference!r} is neither a notebook variable nor an existing file or folder; "
                         f"define the variable or fix the path")


def model_input(value: Any, name: str, allow_list: bool = False) -> Any:
    """What ``nbmerge.merge`` accepts for a notebook value: a state dict, an nn.Module, a path (or a list)."""
    import torch

    from .api import MergeResult

    if isinstance(value, MergeResult):
        return value.state_dict if value.state_dict is not None else value.path
    if isinstance(value, (str, Path, torch.nn.Module)):
        return value
    if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return value
    if allow_list and isinstance(value, (list, tuple)) and value:
        return [model_input(item, f"{name}[{i}]") for i, item in enumerate(value)]
    raise UsageError(f"variable {name!r} holds a {type(value).__name__}; a model is a state dict, an nn.Module, a "
                     f"MergeResult or a path{' (or a list of them)' if allow_list else ''}")


def _add_model(models: dict, label: str, value: Any) -> None:
    unique, count = label, 1
    while unique in models:
        count += 1
        unique = f"{label}#{count}"
    models[unique] = value


def _layer_counts(models: dict) -> dict[str, int]:
    from .names import count_layers
    from .sources import open_model

    counts = {}
    for label, model in models.items():
        source = open_model(model, label)
        try:
            counts[label] = count_layers(source.infos)
        finally:
            source.close()
    return counts


def _in_kernel(shell) -> bool:
    """True in a Jupyter kernel (widgets render), False in a terminal or a plain InteractiveShell."""
    return getattr(shell, "kernel", None) is not None


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot split the line into arguments: {exc}") from None


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(MergeMagics)
