"""Chains of merges in one recipe: mergekit-multi's several YAML documents, each a merge with a ``name`` that the
later ones use as a model.

The documents are ordered so that every merge runs after the merges whose output it uses (a cycle, a name given
twice or two unnamed documents are refused). The final merge is the document without a name, or, when every
document has one, the one merge no other uses; a named merge that feeds nothing else is refused (mergekit-multi
would write it to its intermediate folder; nbmerge writes one output per recipe).

When run, each intermediate merge is written to a folder (``intermediate_dir/<name>``, kept; otherwise
``.<out>.intermediates-XXXX/merges/<name>``, a temporary folder beside the output claimed with
``nbmerge.io.output_claim``, locked while the chain runs and removed after it, or by the next merge to the same
output if this one was killed) and its name resolves to that folder in the merges after it. Where the output
goes and whether it may be replaced are the caller's options, never the recipe's (``nbmerge.recipes``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from nbmerge.errors import OutputWriteError, RecipeError, shown


def chain_from_documents(documents: list, parse_one: Callable[[Mapping], Any]):
    """The final merge's MergeCall with ``intermediates`` (name, MergeCall) in the order they must run."""
    named: dict[str, Any] = {}
    unnamed: list[tuple[int, Any]] = []
    for number, document in enumerate(documents, start=1):
        if not isinstance(document, Mapping):
            raise RecipeError(f"recipe: YAML document {number} of {len(documents)} is not a mapping (each document "
                              f"of a chain is one merge)")
        name = document.get("name")
        call = parse_one({key: value for key, value in document.items() if key != "name"})
        if name is None:
            unnamed.append((number, call))
            continue
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
            raise RecipeError(f"recipe: document {number}: name {shown(name)} must be a plain folder name")
        if name in named:
            raise RecipeError(f"recipe: two documents are named {shown(name)}; give each merge its own name")
        named[name] = call
    if len(unnamed) > 1:
        raise RecipeError(f"recipe: documents {unnamed[0][0]} and {unnamed[1][0]} both have no 'name'; a chain "
                          f"has at most one unnamed (final) merge")
    used = {name: references(call) & set(named) for name, call in named.items()}
    if unnamed:
        final_name, final = None, unnamed[0][1]
    else:
        sinks = [name for name in named if not any(name in uses for uses in used.values())]
        if len(sinks) != 1:
            raise RecipeError(f"recipe: {len(sinks)} of the chain's merges feed no other "
                              f"({', '.join(map(repr, sinks)) or 'every one is used: a cycle'}); leave one "
                              f"document unnamed to say which is the final merge")
        final_name = sinks[0]
        final = named[final_name]
    order = _run_order(final_name, final, named, used)
    unused = [name for name in named if name != final_name and name not in order]
    if unused:
        raise RecipeError(f"recipe: merge {shown(unused[0])} feeds no later merge and is not the final one; nbmerge "
                          f"writes one output per recipe: drop it, or use it in the final merge")
    return replace(final, intermediates=[(name, named[name]) for name in order])


def _run_order(final_name, final, named: dict, used: dict[str, set]) -> list[str]:
    """The named merges the final one needs, each after the ones it uses (depth-first); RecipeError on a cycle."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise RecipeError(f"recipe: the merges {' → '.join(map(repr, cycle))} use each other's output (a cycle)")
        visiting.append(name)
        for dependency in sorted(used[name]):
            visit(dependency)
        visiting.pop()
        order.append(name)

    for dependency in sorted(references(final) & set(named)):
        if dependency == final_name:
            raise RecipeError(f"recipe: merge {shown(final_name)} uses its own output")
        visit(dependency)
    return order


def references(call) -> set[str]:
    """Every model reference a MergeCall reads: models, base, slices' models and bases, a tokenizer source."""
    found = {ref for ref in call.models.values() if isinstance(ref, str)}
    for reference in [call.base, call.options.get("tokenizer_source"),
                      *[piece.base for piece in call.slices or ()]]:
        if isinstance(reference, str):
            found.add(reference)
    for piece in call.slices or ():
        found |= {ref for ref in piece.models.values() if isinstance(ref, str)}
    return found


def run_chain(call, resolve: Callable[[Any], Any], run_one: Callable[..., Any], options: dict):
    """Run ``call.intermediates`` in order to folders, then the final merge, with each name resolving to its
    merge's folder; return the final MergeResult. ``options`` are the final merge's (out, device, progress, ...);
    the intermediates take the run-wide ones (device, progress, on_progress, allow_nonfinite, overwrite)."""
    options = dict(options)
    intermediate_dir = options.pop("intermediate_dir", None)
    run_wide = {key: options[key] for key in ("device", "progress", "on_progress", "allow_nonfinite", "overwrite",
                                              "allow_config_mismatch")
                if key in options}
    folders: dict[str, Path] = {}

    def chained(reference):
        return folders[reference] if isinstance(reference, str) and reference in folders else resolve(reference)

    out = options.get("out")
    overwrite = bool(options.get("overwrite"))
    if out is not None:  # before any intermediate merge runs
        from nbmerge.io.output_claim import check_output_free

        check_output_free(Path(out).expanduser(), overwrite)
    with _intermediate_folder(intermediate_dir, out, overwrite) as root:
        for name, step in call.intermediates:
            result = run_one(step, chained, **run_wide, out=root / name)
            folders[name] = Path(result.path)
        return run_one(replace(call, intermediates=[]), chained, **options)


@contextlib.contextmanager
def _intermediate_folder(intermediate_dir, out, overwrite: bool) -> Iterator[Path]:
    """``intermediate_dir`` (created, kept), else a folder in a locked temporary sibling of ``out`` removed
    afterwards (a system temporary folder when the final merge stays in memory). The merges go one level down
    (``merges/``): each merge's claim locks its output's parent folder, which must not be the locked sibling."""
    if intermediate_dir is not None:
        folder = Path(intermediate_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    if out is None:
        with tempfile.TemporaryDirectory(prefix="nbmerge-intermediates-") as scratch:
            yield Path(scratch)
        return
    from nbmerge.io.output_claim import OutputClaim

    claim = OutputClaim(Path(out).expanduser(), overwrite, kind="intermediates")
    try:
        merges = claim.folder / "merges"
        try:
            merges.mkdir()
        except OSError as exc:
            raise OutputWriteError(exc.errno, f"{merges}: cannot create the chain's intermediate folder "
                                              f"({exc.strerror or exc})") from None
        yield merges
    finally:
        claim.release()
