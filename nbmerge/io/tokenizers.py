"""Which model's tokenizer a merged model gets, and reading a model's vocabulary (``nbmerge.io.vocabularies``
aligns models whose vocabularies differ from it).
"""

from __future__ import annotations

import json
from pathlib import Path

from nbmerge.errors import ParameterError, shown
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
    raise ParameterError(f"tokenizer_source: {shown(tokenizer_source)} is neither one of the merged models nor a model "
                         f"folder")


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
