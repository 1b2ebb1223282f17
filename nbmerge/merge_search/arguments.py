"""The arguments of ``nbmerge search`` and ``%merge_search`` (one parser for both) and the call they make."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def search_parser(prog: str, parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(prog=prog, description="evolve a method's parameters on a task pool (CMA-ES), or its "
                          "models' data flow (--data-flow: which layers, in what order), or make greedy and uniform "
                          "soups of its models")
    parser.add_argument("pool", help="a registered task pool: minilm-tiny, minilm-full, vision-tiny, vision-full, "
                        "or a plugin's")
    parser.add_argument("method", nargs="?", help="the merge method whose parameters are searched")
    parser.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                        help="a searched parameter and its range (repeat for several)")
    parser.add_argument("--fixed", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter passed as it is (JSON or text), e.g. trim_scope=tensor")
    parser.add_argument("--blocks", type=int, default=1, help="anchors over depth per per-model value (default 1)")
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--population", type=int, default=None, help="candidates per generation (CMA-ES default)")
    parser.add_argument("--sigma", type=float, default=0.25, help="initial step size in the unit cube")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="Ray actors (0: score in this process)")
    parser.add_argument("--address", help="a running Ray cluster (default with workers: a local one)")
    parser.add_argument("--checkpoint", help="JSON checkpoint, rewritten every generation; resumes when present")
    parser.add_argument("--soup", action="store_true", help="greedy and uniform soups instead of a search")
    flow = parser.add_argument_group("data-flow search (--data-flow)")
    flow.add_argument("--data-flow", action="store_true", help="evolve a layer stack of the pool's models instead "
                      "of a method's parameters")
    flow.add_argument("--start", help="the model whose layers, in order, the search starts from")
    flow.add_argument("--repeats", type=int, default=2, help="how often every model's layers repeat (default 2)")
    flow.add_argument("--scales", default="0.5:1.5", metavar="LOW:HIGH",
                      help="range of each layer's residual-branch scale, or 'none' (default 0.5:1.5)")
    flow.add_argument("--max-layers", type=int, help="most layers a candidate has (default: twice the base's)")
    flow.add_argument("--extra", action="append", default=[], metavar="NAME=FOLDER",
                      help="a model besides the pool's whose layers the search may use (e.g. an earlier merge)")
    return parser


def run_from_args(args: argparse.Namespace, on_generation: Callable[[Any], None] | None, fail: Callable[[str], Any]):
    """The SearchResult (or SoupResult with ``--soup``) the parsed arguments ask for; ``fail(message)`` reports a
    usage mistake (the parser's ``error``)."""
    from nbmerge.merge_search.runner import greedy_soup, search, search_data_flow

    if args.soup:
        return greedy_soup(args.pool, workers=args.workers, address=args.address)
    if args.data_flow:
        if args.method is not None or args.range:
            return fail("--data-flow searches layers, not a method's parameters: drop METHOD and --range")
        return search_data_flow(args.pool, extra_models=dict(_pair(text, "--extra", fail) for text in args.extra),
                                start=args.start, repeats=args.repeats, scales=_scales(args.scales, fail),
                                max_layers=args.max_layers, generations=args.generations,
                                population=args.population, sigma=args.sigma, seed=args.seed, workers=args.workers,
                                address=args.address, checkpoint=args.checkpoint, on_generation=on_generation)
    if args.method is None or not args.range:
        return fail("give a METHOD and at least one --range NAME=LOW:HIGH (or --soup)")
    ranges = dict(_pair(text, "--range", fail) for text in args.range)
    fixed = {name: _value(value) for name, value in (_pair(text, "--fixed", fail) for text in args.fixed)}
    return search(args.pool, args.method, ranges, blocks=args.blocks, fixed=fixed, generations=args.generations,
                  population=args.population, sigma=args.sigma, seed=args.seed, workers=args.workers,
                  address=args.address, checkpoint=args.checkpoint, on_generation=on_generation)


def generation_line(so_far) -> str:
    last = so_far.generations[-1]
    return (f"generation {len(so_far.generations)}: best {last.best:.2f}, mean {last.mean:.2f}, best so far "
            f"{so_far.best_fitness:.2f} (validation %)")


def _pair(text: str, flag: str, fail) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        fail(f"{flag} {text!r}: expected NAME=VALUE")
    return name.strip(), value.strip()


def _scales(text: str, fail) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        return fail(f"--scales {text!r}: expected LOW:HIGH or none")
    return low, high


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text
