"""IPython magics: ``%merge``, ``%%merge`` (YAML recipes), ``%merge_eval``, ``%merge_sweep``, ``%merge_methods``.

``%merge METHOD MODEL... [--base B] [--out DIR] [--<param> V]... [-o VAR]`` takes the CLI's arguments, generated
from the method's parameter declaration (``nbmerge.arguments``). A model is a notebook variable (state dict,
nn.Module, MergeResult, path, or a list of those) or a path. User mistakes raise a one-line ``UsageError``.
"""

from __future__ import annotations

import argparse
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from nbmerge.arguments import (
    mergekit_parser,
    mergekit_values,
    method_parser,
    params_from_args,
    recipe_parser,
    unknown_flag_message,
)
from nbmerge.display import MethodTable, merge_summary
from nbmerge.errors import NBMergeError
from nbmerge.method_names import choose_method, mergekit_equivalent, mergekit_line_call
from nbmerge.plugins import all_methods, all_task_pools, get_method, plugin_versions, task_pool
from nbmerge.results import MergeResult, is_state_dict

USAGE = """Merge models with any registered method, from a line or from a YAML recipe.

Line:   %merge METHOD MODEL... [--base B] [--out DIR] [--PARAM VALUE]... [-o VAR]
Cell:   %%merge [-o VAR] [--out DIR] [--device D] [--overwrite] [--allow-nonfinite] [--allow-config-mismatch] [--quiet]
        <YAML recipe: mergekit's format (merge_method, models, base_model, parameters, dtype, slices)
         or nbmerge's (method, models, base, params, out_dtype)>

MODEL and B are notebook variables (state dicts, nn.Modules, MergeResults, paths, or lists of them), paths to
.safetensors files / Hugging Face folders, or Hugging Face Hub ids (org/name: the local cache when HF_HUB_OFFLINE=1,
else downloaded). METHOD is nbmerge's or mergekit's name, in any case: mergekit's names (dare_ties, della_linear,
...; linear with --weights) take mergekit's parameters (--weight/--weights, --density, --lambda, ...; per model:
v1,v2,...) and --dtype, mapped as a mergekit recipe is. `{expr}` and `$name` expand in the line. The MergeResult
lands in VAR (`-o VAR`), or is the cell's value. `%merge METHOD --help` shows one method's flags; `%merge_methods`
the table.

Common flags: --base B, --out DIR (default: merge in memory), --device cpu|cuda|auto, --out-dtype DTYPE,
--shard-size 5GB, --overwrite, --allow-nonfinite (merge inputs holding NaN or Inf), --allow-config-mismatch (merge
models whose config.json files disagree on the architecture), --quiet (no progress bar),
-o/--var VAR.

Evaluate: %merge_eval MODEL [--pool P] [--tasks a,b] [--split test] [-o VAR]   (report table + per-task bars)
Sweep:    %merge_sweep METHOD MODEL... --param NAME --values v1,v2,... [--pool P] [--PARAM VALUE]... [-o VAR]
          (merges and evaluates each value; the accuracy curve grows point by point)
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


@contextmanager
def usage_errors(suffix: str = ""):
    """The one boundary where nbmerge's errors become IPython's one-line UsageError (a magic's user mistake)."""
    try:
        yield
    except NBMergeError as exc:
        raise UsageError(one_line(exc) + suffix) from None


def method_help() -> str:
    """The magic's help with every registered method and its parameters (built when asked, so plugins show)."""
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
        """Show every registered merge method (or those named): plugin and version, models, base, parameters
        with ranges: %merge_methods [METHOD...] [-o VAR]. The table is displayed wherever the line stands in its
        cell (not only as the cell's last value); -o VAR also stores it."""
        from IPython.display import display

        parser = _MagicParser(prog="%merge_methods", description="the registered merge methods")
        parser.add_argument("names", nargs="*", help="methods to show (default: all)")
        parser.add_argument("-o", "--var", help="store the table in this notebook variable")
        try:
            args = parser.parse_args(_split(line))
        except _Done:
            return None
        methods = all_methods()
        chosen = [self._method(name) for name in args.names] if args.names else list(methods.values())
        table = MethodTable(chosen, plugin_versions())
        display(table)
        if args.var:
            self.shell.user_ns[_variable(args.var)] = table
        return None

    @line_magic
    def merge_eval(self, line: str):
        """Evaluate a model on a task pool: %merge_eval MODEL [--pool P] [--tasks a,b] [--split test] [-o VAR]."""
        from IPython.display import display

        from nbmerge.notebook.progress_bar import CellProgress
        from nbmerge.workbench import plots
        from nbmerge.workbench.evaluation import evaluate

        parser = _MagicParser(prog="%merge_eval", description="accuracy of a model on every task of a task pool")
        parser.add_argument("model", help="a notebook variable (MergeResult, state dict, module) or a path")
        _add_pool_arguments(parser)
        try:
            args = parser.parse_args(_split(line))
        except _Done:
            return None
        var = None if args.var is None else _variable(args.var)
        model = self._model(args.model)
        pool = self._pool(args.pool)
        # tqdm's notebook bar would be saved as a closed widget: in a kernel, a bar per task that the report
        # replaces; outside one, tqdm's text bar
        bar = CellProgress(f"evaluating {args.model}") if not args.quiet and _in_kernel(self.shell) else None
        summary = ""
        try:
            with usage_errors():
                report = evaluate(model, pool, split=args.split, tasks=_tasks(args.tasks, pool), name=args.model,
                                  progress=not args.quiet and bar is None,
                                  on_progress=None if bar is None else bar.update)
            summary = f"evaluated {args.model} on {pool.name} ({args.split}) in {report.seconds:.1f} s"
        finally:
            if bar is not None:
                bar.finish(summary)
        if var is not None:
            self.shell.user_ns[var] = report
        display(report)
        for figure in plots.report_figures({args.model: report}):
            display(figure)
        return None

    @line_magic
    def merge_sweep(self, line: str):
        """Merge and evaluate once per value of one parameter, drawing the accuracy curve as it grows:
        %merge_sweep METHOD MODEL... [--base B] --param NAME --values v1,v2,... [--pool P] [--PARAM V]... [-o VAR]
        """
        from IPython.display import display

        from nbmerge.workbench.sweep import sweep

        def sweep_arguments(parser) -> None:
            parser.add_argument("--param", required=True, help="the parameter to sweep")
            parser.add_argument("--values", help="comma-separated values (default: the parameter's declared grid)")
            _add_pool_arguments(parser, quiet=False)

        parsed = self._method_line("merge_sweep", line, sweep_arguments,
                                   "give a method, models and --param NAME --values v1,v2,... e.g. %merge_sweep ties "
                                   "models --base base --param density --values 0.1,0.3,0.5")
        if parsed is None:
            return None
        method, args = parsed
        declared = {p.name: p for p in method.params}
        param = declared.get(args.param.replace("-", "_"))
        if param is None:
            raise UsageError(f"%merge_sweep: {method.name} has no parameter {args.param!r} (parameters: "
                             f"{', '.join(declared) or 'none'})")
        var = None if args.var is None else _variable(args.var)
        values = self._sweep_values(method.name, param, args.values)
        fixed = params_from_args(method, args)
        if param.name in fixed:
            raise UsageError(f"%merge_sweep: {param.name} is swept; drop --{args.param}")
        models = self._models(args.models)
        base = None if args.base is None else self._model(args.base)
        pool = self._pool(args.pool)
        plot = display(_Blank(), display_id=True) if _in_kernel(self.shell) else None

        def on_point(so_far) -> None:
            from nbmerge.workbench import plots

            if plot is not None:
                plot.update(plots.sweep_curve(param.name, so_far.values, so_far.reports))
            else:
                print(f"{param.name}={so_far.values[-1]}: average accuracy {so_far.reports[-1].average:.1f}")

        with usage_errors():
            result = sweep(method.name, models, base, param=param.name, values=values, pool=pool, split=args.split,
                           tasks=_tasks(args.tasks, pool), on_point=on_point, device=args.device, **fixed)
        display(result)
        if var is not None:
            self.shell.user_ns[var] = result
        return None

    @line_magic
    def merge_search(self, line: str):
        """Evolve a method's parameters on a task pool with CMA-ES, plotting fitness per generation as it runs:
        %merge_search POOL METHOD --range NAME=LOW:HIGH... [--blocks B] [--generations N] [--workers W]
        [--address A] [--checkpoint FILE] [-o VAR]; or %merge_search POOL --soup (greedy and uniform soups).
        The best recipe so far is a YAML recipe that %%merge runs (``VAR.recipe()``)."""
        from IPython.display import display

        from nbmerge.merge_search.arguments import generation_line, run_from_args, search_parser

        parser = search_parser("%merge_search", parser_class=_MagicParser)
        parser.add_argument("-o", "--var", help="store the result in this notebook variable")
        try:
            args = parser.parse_args(_split(line))
        except _Done:
            return None
        var = None if args.var is None else _variable(args.var)
        plot = display(_Blank(), display_id=True) if _in_kernel(self.shell) else None

        def on_generation(so_far) -> None:
            if plot is not None:
                plot.update(so_far.figure())
            else:
                print(generation_line(so_far))

        with usage_errors():
            result = run_from_args(args, on_generation, parser.error)
        display(result)
        if var is not None:
            self.shell.user_ns[var] = result
        return None

    # -- %merge ------------------------------------------------------------------------------------------------
    def _method_line(self, magic: str, line: str, add_arguments, usage: str):
        """(method, parsed arguments) of a magic's line ``METHOD MODEL... [--flags]``: the method's own parser
        (its parameters as flags) plus what ``add_arguments(parser)`` adds; None when the line asked for help."""
        words = _split(line)
        if not words or words[0].startswith("-"):
            raise UsageError(f"%{magic}: {usage}")
        method = self._method(words[0])
        parser = method_parser(method, f"%{magic} {method.name}", "models: notebook variables or paths",
                               parser_class=_MagicParser)
        add_arguments(parser)
        try:
            args, unknown = parser.parse_known_args(words[1:])
        except _Done:
            return None
        if unknown:
            raise UsageError(one_line(unknown_flag_message(method, unknown)))
        return method, args

    def _merge_line(self, line: str):
        words = _split(line)
        if words and not words[0].startswith("-"):
            with usage_errors("; %merge_methods lists them"):
                choice = choose_method(words[0], words[1:])
            if choice.mergekit:
                return self._merge_mergekit(choice.name, words[1:])

        def merge_arguments(parser) -> None:
            parser.add_argument("-o", "--var", help="store the MergeResult in this notebook variable")

        parsed = self._method_line("merge", line, merge_arguments,
                                   "give a method and models, e.g. %merge ties ft_a ft_b --base base -o merged (see "
                                   "%merge? and %merge_methods)")
        if parsed is None:
            return None
        method, args = parsed
        models = self._models(args.models)
        base = None if args.base is None else self._model(args.base)
        options = dict(out=args.out, device=args.device, out_dtype=args.out_dtype, shard_size=args.shard_size,
                       overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite,
                       allow_config_mismatch=args.allow_config_mismatch)
        if method.build_module is not None:  # test-time adaptation on a task pool's unlabeled inputs
            with usage_errors():
                options.update(pool=task_pool(args.pool, progress=not args.quiet), split=args.split)
        params = params_from_args(method, args)
        from nbmerge.api import merge

        return self._run(method.name, args.var, args.quiet,
                         lambda **progress: merge(method.name, models, base=base, **options, **params, **progress))

    def _merge_mergekit(self, name: str, words: list[str]):
        """``%merge NAME ...`` with a mergekit method name: its parameters as flags, run as its recipe would be."""
        from nbmerge.recipes import run_recipe

        parser = mergekit_parser(name, f"%merge {name}", "models: notebook variables, paths or Hub ids",
                                 parser_class=_MagicParser)
        parser.add_argument("-o", "--var", help="store the MergeResult in this notebook variable")
        try:
            args = parser.parse_args(words)
        except _Done:
            return None
        with usage_errors():
            call = mergekit_line_call(name, args.models, args.base, mergekit_values(args), args.dtype,
                                      args.out_dtype)
        resolved = {reference: self._model(reference) for reference in {*call.models.values(), call.base} - {None}}
        options = dict(out=args.out, device=args.device, shard_size=args.shard_size,
                       overwrite=args.overwrite or None, allow_nonfinite=args.allow_nonfinite or None)
        return self._run(call.method, args.var, args.quiet,
                         lambda **progress: run_recipe(call, resolved.__getitem__, **options, **progress))

    # -- %%merge -----------------------------------------------------------------------------------------------
    def _merge_recipe(self, line: str, cell: str):
        from nbmerge.recipes import models_to_resolve, parse_recipe, run_recipe

        parser = recipe_parser("%%merge", "merge with the YAML recipe in the cell body", _MagicParser)
        parser.add_argument("-o", "--var", help="store the MergeResult in this notebook variable")
        try:
            args = parser.parse_args(_split(line))
        except _Done:
            return None
        with usage_errors():
            call = parse_recipe(cell)
        steps = [call, *(step for _, step in call.intermediates)]
        for step in steps:
            for method in [piece.method for piece in step.slices] if step.slices else [step.method]:
                self._method(method)
        resolved: dict[str, Any] = {}

        def resolve(reference: str) -> Any:
            if reference not in resolved:
                resolved[reference] = self._model(reference)
            return resolved[reference]

        for reference in models_to_resolve(call):
            resolve(reference)  # every reference checked before anything runs
        options = {key: getattr(args, key) for key in ("out", "device", "intermediate_dir")}
        options.update({flag: True for flag in ("overwrite", "allow_nonfinite", "allow_config_mismatch")
                        if getattr(args, flag)})
        title = "layer stack" if call.method == "stack" else call.method
        return self._run(title, args.var, args.quiet,
                         lambda **progress: run_recipe(call, resolve, **options, **progress))

    # -- shared ------------------------------------------------------------------------------------------------
    def _run(self, title: str, var: str | None, quiet: bool, execute: Callable[..., Any]):
        """``execute(progress=..., on_progress=...)`` under a progress bar; the result goes to ``var`` (with a
        summary printed) or is returned."""
        from nbmerge.notebook.progress_bar import CellProgress

        if var is not None and not var.isidentifier():
            raise UsageError(f"-o {var}: not a valid variable name")
        # in a kernel: a widget bar that the summary replaces; in a terminal: tqdm's text bar
        bar = CellProgress(f"nbmerge {title}") if not quiet and _in_kernel(self.shell) else None
        summary = ""
        try:
            with usage_errors():
                result = execute(progress=not quiet and bar is None, on_progress=None if bar is None else bar.update)
            summary = merge_summary(result, var)
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

    def _pool(self, name: str | None):
        """A notebook variable holding a TaskPool (``nbmerge.lm_pool(...)``), else the registered task pool of that
        name, built once per session; without a name, the last one used (or the only one registered)."""
        from nbmerge.taskpool import TaskPool

        pools = self.__dict__.setdefault("_pools", {})
        if name is not None and name.isidentifier() and isinstance(self.shell.user_ns.get(name), TaskPool):
            pools[name] = self.shell.user_ns[name]
            self.__dict__["_last_pool"] = name
            return pools[name]
        if name is None:
            registered = sorted(all_task_pools())
            name = self.__dict__.get("_last_pool") or (registered[0] if len(registered) == 1 else None)
            if name is None:
                raise UsageError(f"choose a task pool with --pool NAME (registered: {', '.join(registered)})")
        if name not in pools:
            with usage_errors():
                pools[name] = task_pool(name)
        self.__dict__["_last_pool"] = name
        return pools[name]

    def _sweep_values(self, method: str, param, text: str | None) -> list:
        if text is None:
            if not param.grid:
                raise UsageError(f"%merge_sweep: give --values for {param.name} (it declares no grid of its own)")
            return list(param.grid)
        with usage_errors():
            return [param.check(part.strip(), method) for part in text.split(",") if part.strip()]

    def _method(self, name: str):
        """nbmerge's method of that name (in any case); mergekit's names run only in %merge and %%merge."""
        with usage_errors("; %merge_methods lists them"):
            choice = choose_method(name, [])
            if choice.mergekit:
                raise UsageError(f"{name!r} is mergekit's name for {mergekit_equivalent(choice.name)}: %merge "
                                 f"{choice.name} takes it; here name nbmerge's method")
            return get_method(choice.name)

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
        from nbmerge.io.hub import HubModelUnavailable, hub_folder, is_hub_id

        if is_hub_id(reference):  # org/name: the Hub's model, from the local cache or downloaded
            try:
                return hub_folder(reference, f"model {reference!r}")
            except HubModelUnavailable as exc:
                raise UsageError(one_line(f"model {reference!r} is neither a notebook variable nor an existing file "
                                          f"or folder (define the variable or fix the path); as a Hugging Face Hub "
                                          f"id: {exc.reason}")) from None
        raise UsageError(f"model {reference!r} is neither a notebook variable nor an existing file or folder; "
                         f"define the variable or fix the path")


def model_input(value: Any, name: str, allow_list: bool = False) -> Any:
    """What ``nbmerge.merge`` accepts for a notebook value: a state dict, an nn.Module, a path (or a list)."""
    import torch

    if isinstance(value, MergeResult):
        return value.state_dict if value.state_dict is not None else value.path
    if isinstance(value, (str, Path, torch.nn.Module)) or is_state_dict(value):
        return value
    if allow_list and isinstance(value, (list, tuple)) and value:
        return [model_input(item, f"{name}[{i}]") for i, item in enumerate(value)]
    raise UsageError(f"variable {name!r} holds a {type(value).__name__}; a model is a state dict, an nn.Module, a "
                     f"MergeResult or a path{' (or a list of them)' if allow_list else ''}")


def _add_pool_arguments(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    parser.add_argument("--pool", help="a notebook variable holding a task pool, or a registered pool's name "
                        "(default: the last one used, or the only one registered)")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task of the pool)")
    parser.add_argument("--split", default="test", help="train, validation or test (default: test)")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("-o", "--var", help="store the result in this notebook variable")


def _tasks(text: str | None, pool) -> list[str] | None:
    """The task names of ``--tasks``, each checked against the pool's tasks."""
    if not text:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = [task.name for task in pool.tasks]
    for name in names:
        if name not in known:
            raise UsageError(f"--tasks: pool {pool.name!r} has no task {name!r} (tasks: {', '.join(known)})")
    return names


def _variable(name: str) -> str:
    if not name.isidentifier():
        raise UsageError(f"-o {name}: not a valid variable name")
    return name


class _Blank:
    """An empty display, later replaced by the sweep's figure."""

    def _repr_html_(self) -> str:
        return "<i>sweeping…</i>"


def _add_model(models: dict, label: str, value: Any) -> None:
    unique, count = label, 1
    while unique in models:
        count += 1
        unique = f"{label}#{count}"
    models[unique] = value


def _in_kernel(shell) -> bool:
    """True in a Jupyter kernel (widgets render), False in a terminal or a plain InteractiveShell."""
    return getattr(shell, "kernel", None) is not None


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot split the line into arguments: {exc}") from None
