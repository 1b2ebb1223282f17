"""The command line: ``nbmerge merge METHOD MODEL... [--base B] [--out DIR] [--<param> V]...``, ``nbmerge merge
--recipe FILE``, ``nbmerge search`` and
``nbmerge methods [--json]``. Each method's flags are generated from its parameter declaration."""

from __future__ import annotations

import argparse
import json
import sys

from nbmerge.arguments import mergekit_parser, mergekit_values, method_parser, params_from_args, recipe_parser
from nbmerge.errors import NBMergeError
from nbmerge.method_names import choose_method

MODELS_HELP = "models: .safetensors files, Hugging Face folders, or Hugging Face Hub ids (org/name)"


def _merge(argv: list[str]) -> int:
    from nbmerge.api import merge
    from nbmerge.plugins import get_method

    if argv and argv[0].startswith("--recipe"):
        return _merge_recipe(argv)
    if not argv or argv[0].startswith("-"):
        print("usage: nbmerge merge METHOD MODEL... [--base B] [--out DIR] [--PARAM VALUE]...\n"
              "       nbmerge merge --recipe FILE.yml [--out DIR] [--device D] [--overwrite]", file=sys.stderr)
        return 2
    choice = choose_method(argv[0], argv[1:])
    if choice.mergekit:
        return _merge_mergekit(choice.name, argv[1:])
    method = get_method(choice.name)
    parser = method_parser(method, f"nbmerge merge {method.name}", MODELS_HELP)
    args = parser.parse_args(argv[1:])
    params = params_from_args(method, args)
    if method.build_module is not None:
        from nbmerge.plugins import task_pool

        params.update(pool=task_pool(args.pool, progress=not args.quiet), split=args.split)
    result = merge(method.name, args.models, base=args.base, out=args.out, device=args.device,
                   out_dtype=args.out_dtype, shard_size=args.shard_size, overwrite=args.overwrite,
                   allow_nonfinite=args.allow_nonfinite, allow_config_mismatch=args.allow_config_mismatch,
                   progress=not args.quiet, **params)
    if result.history is not None:
        print(result.history)
    print(result.report)
    if result.path is not None:
        print(f"wrote {result.path}")
    return 0


def _merge_mergekit(name: str, argv: list[str]) -> int:
    """``nbmerge merge NAME ...`` for a mergekit method name (``nbmerge.method_names``): its parameters as flags,
    mapped and run as its recipe would be."""
    from nbmerge.method_names import mergekit_line_call
    from nbmerge.recipes import run_recipe

    parser = mergekit_parser(name, f"nbmerge merge {name}", MODELS_HELP)
    args = parser.parse_args(argv)
    call = mergekit_line_call(name, args.models, args.base, mergekit_values(args), args.dtype, args.out_dtype)
    result = run_recipe(call, out=args.out, device=args.device, shard_size=args.shard_size,
                        overwrite=args.overwrite or None, allow_nonfinite=args.allow_nonfinite or None,
                        progress=not args.quiet)
    print(result.report)
    if result.path is not None:
        print(f"wrote {result.path}")
    return 0


def _merge_recipe(argv: list[str]) -> int:
    """``nbmerge merge --recipe FILE.yml``: a mergekit or nbmerge recipe (model references are paths)."""
    from pathlib import Path

    from nbmerge.errors import ModelInputError
    from nbmerge.io.untrusted import read_bytes
    from nbmerge.recipes import MAX_RECIPE_CHARS, parse_recipe, run_recipe

    parser = recipe_parser("nbmerge merge --recipe", "merge with a YAML recipe (mergekit's format or nbmerge's)")
    parser.add_argument("--recipe", required=True, help="the recipe file (.yml, .yaml or .json)")
    args = parser.parse_args(argv)
    path = Path(args.recipe).expanduser()
    try:
        text = read_bytes(path, MAX_RECIPE_CHARS).decode()  # a regular file only: a FIFO would block the read
    except (ModelInputError, UnicodeDecodeError) as exc:
        print(f"nbmerge: error: --recipe {path}: cannot read it ({exc})", file=sys.stderr)
        return 1
    call = parse_recipe(text)
    if args.out is None:
        print(f"nbmerge: error: --recipe {path}: say where the merge goes: --out DIR", file=sys.stderr)
        return 2
    result = run_recipe(call, out=args.out, device=args.device, overwrite=args.overwrite,
                        allow_nonfinite=args.allow_nonfinite or None,
                        allow_config_mismatch=args.allow_config_mismatch or None, intermediate_dir=args.intermediate_dir,
                        progress=not args.quiet)
    print(result.report)
    if result.path is not None:
        print(f"wrote {result.path}")
    return 0


def _search(argv: list[str]) -> int:
    """``nbmerge search POOL METHOD --range NAME=LOW:HIGH ...`` (CMA-ES), ``nbmerge search POOL --data-flow`` or
    ``nbmerge search POOL --soup``."""
    from nbmerge.merge_search.arguments import generation_line, run_from_args, search_parser

    parser = search_parser("nbmerge search")
    parser.add_argument("--recipe-out", help="write the best candidate's recipe (YAML) here")
    args = parser.parse_args(argv)
    result = run_from_args(args, lambda so_far: print(generation_line(so_far), flush=True), parser.error)
    print(result)
    if not args.soup:
        print(result.recipe(), end="")
        if args.recipe_out:
            from nbmerge.io.text_files import write_text_atomically

            write_text_atomically(args.recipe_out, result.recipe())
            print(f"wrote {args.recipe_out}")
    return 0


def _methods(argv: list[str]) -> int:
    from nbmerge.display import MethodTable
    from nbmerge.plugins import all_methods, broken_plugins, plugin_versions

    parser = argparse.ArgumentParser(prog="nbmerge methods", description="list the registered merge methods")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    versions = plugin_versions()
    methods = all_methods().values()
    if args.json:
        described = [dict(m.describe(), plugin_version=versions.get(m.plugin, "")) for m in methods]
        print(json.dumps(described, indent=2))
        return 0
    print(MethodTable(methods, versions, flags=True))
    for name, error in broken_plugins().items():
        print(f"broken plugin {name}: {error}")
    return 0


def _demo(argv: list[str]) -> int:
    """Build a small Llama checkpoint set on this machine and merge it with every registered method."""
    from pathlib import Path

    import torch

    from nbmerge.api import merge
    from nbmerge.method.declaration import BASE_REQUIRED
    from nbmerge.plugins import all_methods
    from nbmerge.workbench.models.synthetic_llama import LlamaShape, build_llama_set

    parser = argparse.ArgumentParser(prog="nbmerge demo", description=_demo.__doc__)
    parser.add_argument("--workdir", default=".nbmerge-demo", help="where the models and merges are written")
    parser.add_argument("--layers", type=int, default=8, help="layers of the demo model (default 8)")
    parser.add_argument("--quick", action="store_true",
                        help="a two-layer model of width 64 (seconds; what the test suite runs)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    shape = LlamaShape(layers=2, hidden=64, intermediate=172, vocab=256) if args.quick else LlamaShape(layers=args.layers)
    print(f"building base + 3 fine-tunes ({shape.nbytes(torch.float32) / 2**20:.0f} MiB each) in {workdir}/models")
    checkpoints = build_llama_set(workdir / "models", shape, shard_size=20 * 2**20)
    print(f"{'method':<17} {'models':>6} {'base':>4} {'tensors':>7} {'read MiB':>9} {'seconds':>8} {'peak RSS MiB':>12}")
    for method in all_methods().values():
        if method.build_module is not None:
            print(f"{method.name:<17} (builds a module from a task pool's inputs: see docs/methods.md)")
            continue
        count = min(method.max_models or 3, 3)
        base = checkpoints.base if method.base == BASE_REQUIRED else None
        # a parameter with a declared example (required ones, or a cheaper setting than a slow default) gets it
        required = {p.name: p.example for p in method.params if p.example is not None}
        print(f"{method.name:<17}", end="", flush=True)  # the row starts while its merge runs: the demo's progress
        result = merge(method.name, checkpoints.models[:count], base=base, out=workdir / "merged" / method.name,
                       overwrite=True, progress=False, **required)
        report = result.report
        print(f" {count:>6} {'yes' if base else 'no':>4} {report.tensors:>7} "
              f"{report.bytes_read / 2**20:>9.1f} {report.seconds:>8.2f} {report.peak_rss_bytes / 2**20:>12.0f}")
    print(f"merged models (loadable with transformers) are in {workdir}/merged/")
    return 0


def _bench(argv: list[str]) -> int:
    from nbmerge.workbench.bench import run_bench
    from nbmerge.workbench.models.training import SPLITS

    parser = argparse.ArgumentParser(prog="nbmerge bench", description="Evaluate every merge method (defaults and a "
                                     "validation-tuned grid) next to the pretrained and the individual models.")
    parser.add_argument("--profile", choices=("tiny", "full"), default="tiny",
                        help="the MiniLM zoo's size (default: tiny); ignored when --pool is given")
    parser.add_argument("--pool", help="a registered task pool (default: minilm-PROFILE)")
    parser.add_argument("--methods", nargs="+", help="methods to run (default: every registered method)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="zoo seeds (default: 0 1 2)")
    parser.add_argument("--no-tune", action="store_true", help="defaults only, no validation grid")
    parser.add_argument("--cache-dir", help="where zoos are built and cached (default: $NBMERGE_CACHE or "
                        "~/.cache/nbmerge)")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--add-to", metavar="PATH", help="add this run's rows to the table in PATH (a --json file "
                        "of the same pool and seeds) and write it back, e.g. adaptive methods after the static ones")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=VALUE",
                        help="fix a method's parameter in all its rows (repeatable), e.g. --set we_moe.steps=300")
    parser.add_argument("--label", action="append", default=[], metavar="METHOD=ROW",
                        help="name METHOD's rows ROW (repeatable), e.g. --label we_moe=we_moe_task_batches")
    parser.add_argument("--data-split", choices=SPLITS, default="test",
                        help="the split whose unlabeled inputs the data-reading methods (RegMean, Fisher, AdaMerging, "
                        "WE-MoE) see (default: test, test-time adaptation; FusionBench's RegMean and Fisher: train)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    pool = args.pool or f"minilm-{args.profile}"
    earlier = None
    if args.add_to:
        from nbmerge.workbench.bench import BenchResult

        earlier = BenchResult.from_json(args.add_to)
        earlier.check_addable(pool, args.seeds)  # before the run, not after it
    result = run_bench(pool, methods=args.methods, seeds=args.seeds, tune=not args.no_tune,
                       cache_dir=args.cache_dir, progress=not args.quiet, threads=args.threads,
                       overrides=_overrides(args.set), labels=_labels(args.label), data_split=args.data_split)
    if earlier is not None:
        result = result.added_to(earlier)
        result.to_json(args.add_to)
        print(f"added to {args.add_to}")
    print(result)
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _labels(settings: list[str]) -> dict[str, str]:
    """``["we_moe=we_moe_task_batches"]`` -> ``{"we_moe": "we_moe_task_batches"}``."""
    from nbmerge.errors import ParameterError

    labels = {}
    for setting in settings:
        method, equals, row = setting.partition("=")
        if not (equals and method and row):
            raise ParameterError(f"bench: --label {setting!r}: expected METHOD=ROW, e.g. we_moe=we_moe_task_batches")
        labels[method] = row
    return labels


def _overrides(settings: list[str]) -> dict[str, dict]:
    """``["we_moe.steps=300"]`` -> ``{"we_moe": {"steps": 300}}`` (values read as JSON where they parse)."""
    from nbmerge.errors import ParameterError

    overrides: dict[str, dict] = {}
    for setting in settings:
        target, equals, text = setting.partition("=")
        method, dot, param = target.partition(".")
        if not (equals and dot and method and param):
            raise ParameterError(f"bench: --set {setting!r}: expected METHOD.PARAM=VALUE, e.g. we_moe.steps=300")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = text
        overrides.setdefault(method, {})[param] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"merge": _merge, "methods": _methods, "demo": _demo, "bench": _bench, "search": _search}
    if not argv or argv[0] not in commands:
        print("usage: nbmerge {merge,methods,demo,bench,search} ...\n  nbmerge methods [--json]\n"
              "  nbmerge demo [--workdir DIR]\n  nbmerge bench [--profile tiny|full] [--methods M...] [--json PATH]\n"
              "  nbmerge merge METHOD MODEL... [--base B] [--out DIR] [--PARAM VALUE]...\n"
              "  nbmerge merge --recipe FILE.yml [--out DIR] [--device D] [--overwrite]\n"
              "  nbmerge search POOL METHOD --range NAME=LOW:HIGH... [--generations N] [--workers W] | POOL --data-flow | POOL --soup",
              file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except NBMergeError as exc:
        print(f"nbmerge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nbmerge: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
