"""Which model's tokenizer a merged model gets, and reading a model's vocabulary (``nbmerge.io.vocabularies``
aligns models whose vocabularies differ from it).
"""

from __future__ import annotations

from pathlib import Path

from nbmerge.errors import ModelInputError, ParameterError, shown
from nbmerge.io.sources import ModelSource
from nbmerge.io.untrusted import model_file, model_json


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
    where the folder has neither. The files are read bounded and inside the model's repository
    (``nbmerge.io.untrusted``); a vocabulary that is not token -> non-negative integer id is a ModelInputError
    naming the file."""
    if folder is None:
        return None
    name = "tokenizer.json"
    if model_file(folder, name, label) is not None:
        data = model_json(folder, name, label)
        model = data.get("model") if isinstance(data, dict) else None
        table = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(table, list):  # Unigram: [[token, score], ...]
            table = {entry[0]: i for i, entry in enumerate(table)
                     if isinstance(entry, list) and entry and isinstance(entry[0], str)}
        added = data.get("added_tokens") if isinstance(data, dict) else None
        if isinstance(table, dict) and isinstance(added, list):
            table = {**table, **{entry["content"]: entry["id"] for entry in added
                                 if isinstance(entry, dict) and isinstance(entry.get("content"), str)
                                 and "id" in entry}}
        elif isinstance(table, dict) and added is not None:
            table = None
    elif model_file(folder, "vocab.json", label) is not None:
        table, name = model_json(folder, "vocab.json", label), "vocab.json"
    else:
        return None
    if not isinstance(table, dict) or not all(isinstance(token, str) and type(index) is int and index >= 0
                                              for token, index in table.items()):
        raise ModelInputError(f"{label}: {Path(folder) / name}: not a vocabulary (token -> non-negative integer "
                              f"id)")
    return dict(table)
