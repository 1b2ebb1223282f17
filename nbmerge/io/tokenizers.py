"""Which tokenizer a merged model gets, and the check that every merged model's vocabulary equals it.

nbmerge copies one model's tokenizer files into the output; it does not permute embedding rows, so a merge of
models whose token → id tables differ is refused with the first differing token.
"""

from __future__ import annotations

import json
from pathlib import Path

from nbmerge.errors import ParameterError
from nbmerge.io.sources import ModelSource


def choose_tokenizer_folder(tokenizer_source, sources: list[ModelSource], labelled: list, base) -> Path | None:
    """The folder whose tokenizer files the output gets: that of the model ``tokenizer_source`` names (a label,
    the model object or path given, or another model's folder), or "union" (the base's, else the first model's).
    Every merged model's vocabulary must equal it: nbmerge copies one tokenizer and does not permute embeddings."""
    if tokenizer_source is None:
        return None
    candidates = list(zip([label for label, _ in labelled], sources[:len(labelled)], [m for _, m in labelled]))
    if base is not None:
        candidates.append((sources[-1].label, sources[-1], base))
    if tokenizer_source == "union":
        chosen = sources[-1] if base is not None else sources[0]
        folder, label = chosen.folder, chosen.label
    else:
        chosen = next((source for label, source, model in candidates
                       if tokenizer_source is model or tokenizer_source == label
                       or (isinstance(tokenizer_source, (str, Path)) and isinstance(model, (str, Path))
                           and Path(tokenizer_source).expanduser() == Path(model).expanduser())), None)
        if chosen is not None:
            folder, label = chosen.folder, chosen.label
        elif isinstance(tokenizer_source, (str, Path)) and Path(tokenizer_source).expanduser().is_dir():
            folder, label = Path(tokenizer_source).expanduser(), str(tokenizer_source)
        else:
            raise ParameterError(f"tokenizer_source: {tokenizer_source!r} is neither one of the merged models nor "
                                 f"a model folder")
    wanted = read_vocabulary(folder, label)
    for _, source, _ in candidates:
        have = read_vocabulary(source.folder, source.label)
        if have is None or wanted is None or have == wanted:
            continue
        token = min(t for t in set(have) | set(wanted) if have.get(t) != wanted.get(t))
        what = "a union of the vocabularies" if tokenizer_source == "union" else f"the tokenizer of {label}"
        raise ParameterError(f"tokenizer_source: {source.label}'s vocabulary differs from {label}'s (token "
                             f"{token!r}); {what} would need embedding rows permuted, which nbmerge does not do: "
                             f"merge models that share one tokenizer")
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
