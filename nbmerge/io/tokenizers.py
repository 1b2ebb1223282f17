"""Which tokenizer a merged model gets, reading a model's vocabulary, and (for layer stacks, which do not permute
embedding rows) the check that every model's vocabulary equals it. ``nbmerge.io.vocabularies`` aligns a merge's
models whose vocabularies differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from nbmerge.errors import ParameterError
from nbmerge.io.sources import ModelSource


def tokenizer_target(tokenizer_source, sources: list[ModelSource], labelled: list, base) -> tuple[Path | None, str]:
    """The folder whose tokenizer the output takes, and its label: that of the model ``tokenizer_source`` names (a
    label, the model object or path given, or another model's folder); for "union", the base's (else the first
    model's), the tokenizer the union starts from."""
    if tokenizer_source == "union":
        chosen = sources[-1] if base is not None else sources[0]
        return chosen.folder, chosen.label
    for (label, model), source in zip([*labelled, *([("base", base)] if base is not None else [])],
                                      [*sources[:len(labelled)], *([sources[-1]] if base is not None else [])]):
        if (tokenizer_source is model or tokenizer_source == label or tokenizer_source == source.label
                or (isinstance(tokenizer_source, (str, Path)) and isinstance(model, (str, Path))
                    and Path(tokenizer_source).expanduser() == Path(model).expanduser())):
            return source.folder, source.label
    if isinstance(tokenizer_source, (str, Path)) and Path(tokenizer_source).expanduser().is_dir():
        return Path(tokenizer_source).expanduser(), str(tokenizer_source)
    raise ParameterError(f"tokenizer_source: {tokenizer_source!r} is neither one of the merged models nor a model "
                         f"folder")


def choose_tokenizer_folder(tokenizer_source, sources: list[ModelSource], labelled: list, base) -> Path | None:
    """``tokenizer_target``'s folder, for a layer stack: every model's vocabulary must equal it (a stack does not
    permute embedding rows; ``nbmerge.merge`` does, nbmerge.io.vocabularies)."""
    if tokenizer_source is None:
        return None
    folder, label = tokenizer_target(tokenizer_source, sources, labelled, base)
    wanted = read_vocabulary(folder, label)
    for source in sources:
        have = read_vocabulary(source.folder, source.label)
        if have is None or wanted is None or have == wanted:
            continue
        token = min(t for t in set(have) | set(wanted) if have.get(t) != wanted.get(t))
        what = "a union of the vocabularies" if tokenizer_source == "union" else f"the tokenizer of {label}"
        raise ParameterError(f"tokenizer_source: {source.label}'s vocabulary differs from {label}'s (token "
                             f"{token!r}); {what} would need embedding rows permuted, which a layer stack does "
                             f"not do: stack models that share one tokenizer")
    return folder


def read_vocabulary(folder: Path | None, label: str) -> dict | None:
    """token -> id of a model's tokenizer (tokenizer.json's model.vocab and added tokens, or vocab.json); None
    where the folder has neither."""
    if folder is None:
        return None
    tokenizer, vocab = folder / "tokenizer.json", folder / "vocab.json"
    try:
        if tokenizer.is_file():
            data = json.loads(tokenizer.read_text())
            table = data.get("model", {}).get("vocab")
            table = dict(table) if isinstance(table, dict) else {
                entry[0]: i for i, entry in enumerate(table or []) if isinstance(entry, list) and entry}
            table.update({added["content"]: added["id"] for added in data.get("added_tokens", [])
                          if isinstance(added, dict) and "content" in added and "id" in added})
            return table
        if vocab.is_file():
            return dict(json.loads(vocab.read_text()))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ParameterError(f"tokenizer_source: cannot read the vocabulary of {label} ({exc})") from None
    return None
