"""Models with different vocabularies merged under one tokenizer: embedding rows permuted to its token ids, as
mergekit 0.1.5 does for ``tokenizer_source``.

The output vocabulary V is one model's tokenizer, or the union (mergekit's ``build_union_tokenizer``: the base's
tokenizer, else the first model's, with every other model's tokens it lacks added in the models' order, then their
added tokens; within a model in id order. mergekit takes those in a hash map's order, and without a base_model
starts from a model drawn from a set, both of which change from run to run: its union has the same tokens and
rows, under ids that may differ). A layer stack fills each vocabulary tensor within the slice it comes from.
Each model's vocabulary is its tokenizer's token → id table, ids below its config's ``vocab_size``.
A vocabulary tensor (outside the layer stack, its first dimension the model's ``vocab_size``: embeddings, LM head)
of model m becomes, row by row over V,
  row_t = E_m[id_m(t)]                      where m has token t, else the same fill for every model lacking it:
  the row of the one model that has t; the base's row where the base has t (and two or more models do); the mean
  of the rows of the models that have t; zeros where none has it.
With ``pad_to_multiple_of`` = k (mergekit's ``tokenizer: {pad_to_multiple_of: k}``) the tensors get ⌈|V| / k⌉·k
rows, and each model's rows past |V| are the mean of its own |V| aligned rows (every model is rewritten, even one
whose vocabulary is the output's). The output config's ``vocab_size`` becomes that row count (|V| unpadded).
Building the union tokenizer needs ``transformers``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbmerge.errors import ParameterError, shown
from nbmerge.io.buffers import BufferPool
from nbmerge.io.sources import ModelSource, SourceView, TensorInfo
from nbmerge.io.untrusted import TOKENIZER_FILES, check_model_files, model_file, model_json
from nbmerge.method.tensor_names import layer_index


@dataclass
class VocabularyPlan:
    """What a merge under ``tokenizer_source`` needs: the folder whose tokenizer files the output gets, the model
    sources (each aligned to the output vocabulary where its own differs), config edits, and a temporary folder
    (a built union tokenizer) to remove when the merge ends."""

    tokenizer_folder: Path | None
    groups: list[list[ModelSource]]  # per group of plan_vocabulary (one by default), its sources aligned
    config_edits: dict = field(default_factory=dict)
    scratch: tempfile.TemporaryDirectory | None = None

    @property
    def sources(self) -> list[ModelSource]:
        return self.groups[0]

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()


def plan_vocabulary(tokenizer_folder: Path | None, union: bool, sources: list[ModelSource],
                    base_index: int | None, groups: list[tuple[list[int], int | None]] | None = None,
                    pad_to_multiple_of: int | None = None) -> VocabularyPlan:
    """Align ``sources`` (the base at ``base_index``) to the tokenizer of ``tokenizer_folder``, or to the union
    of the models' tokenizers; unchanged where every model already has the output's token ids and row count and
    no padding is asked for.

    ``groups`` (source indices and the group's base index): the fills are taken within each group, as mergekit
    fills a layer stack's embeddings from the slice that provides them (default: one group of every source)."""
    from nbmerge.io.tokenizers import read_vocabulary

    tables = [read_vocabulary(source.folder, source.label) for source in sources]  # None: no tokenizer files
    vocabularies = [_model_vocabulary(source, table) for source, table in zip(sources, tables)]
    if union:
        tokens, scratch, tokenizer_folder = _union(sources, base_index)
    else:
        tokens, scratch = read_vocabulary(tokenizer_folder, str(tokenizer_folder)), None
    groups = groups or [(list(range(len(sources))), base_index)]
    unchanged = [[sources[i] for i in members] for members, _ in groups]
    if tokens is None:
        if pad_to_multiple_of is not None:
            raise ParameterError(f"pad_to_multiple_of: the output's tokenizer ({tokenizer_folder}) has no token "
                                 f"table to pad the vocabulary after")
        return VocabularyPlan(tokenizer_folder, unchanged, {}, scratch)
    token_count = max(tokens.values()) + 1
    size = padded_size(token_count, pad_to_multiple_of)
    by_id = [None] * size
    for token, index in tokens.items():
        by_id[index] = token
    needed = [table is not None and (table != tokens or (vocabulary is not None and vocabulary[1] != size))
              for table, vocabulary in zip(tables, vocabularies)]
    if not any(needed) and size == token_count:
        return VocabularyPlan(tokenizer_folder, unchanged, {}, scratch)
    missing = [source.label for source, vocabulary in zip(sources, vocabularies) if vocabulary is None]
    if missing:
        reason = "the models' vocabularies differ" if any(needed) else "pad_to_multiple_of pads the vocabulary"
        raise ParameterError(f"tokenizer_source: {reason}, and {missing[0]} has no "
                             f"tokenizer files or no vocab_size in its config.json, which permuting its embedding "
                             f"rows needs")
    aligned = []
    for members, group_base in groups:
        alignment = VocabularyAlignment([sources[i] for i in members], [vocabularies[i] for i in members], by_id,
                                        None if group_base is None else members.index(group_base), token_count)
        aligned.append([AlignedSource(sources[i], alignment, k) for k, i in enumerate(members)])
    return VocabularyPlan(tokenizer_folder, aligned, {"vocab_size": size}, scratch)


def check_padding(pad_to_multiple_of: int | None, tokenizer_source) -> None:
    """Before any file is read: ``pad_to_multiple_of`` is a positive integer and comes with a tokenizer_source."""
    if pad_to_multiple_of is None:
        return
    padded_size(1, pad_to_multiple_of)
    if tokenizer_source is None:
        raise ParameterError("pad_to_multiple_of pads the vocabulary of the output's tokenizer: give "
                             "tokenizer_source too (mergekit's tokenizer: {source: union} is tokenizer_source='union')")


def padded_size(token_count: int, multiple: int | None) -> int:
    """``token_count`` rounded up to a multiple of ``multiple`` (None: unchanged)."""
    if multiple is None:
        return token_count
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ParameterError(f"pad_to_multiple_of must be a positive integer, got {shown(multiple)}")
    return -(-token_count // multiple) * multiple


def _model_vocabulary(source: ModelSource, table: dict | None) -> tuple[dict, int] | None:
    """(token → id below the model's vocab_size, vocab_size) from its tokenizer and config.json."""
    config = None if table is None else model_json(source.folder, "config.json", source.label)
    if not isinstance(config, dict):
        return None
    text_config = config.get("text_config")
    size = config.get("vocab_size") or (text_config.get("vocab_size") if isinstance(text_config, dict) else None)
    if type(size) is not int or size < 1:
        return None
    return {token: index for token, index in table.items() if index < size}, size


def _union(sources: list[ModelSource], base_index: int | None):
    """mergekit's union tokenizer, built with transformers into a temporary folder: (token → id, scratch, folder)."""
    try:
        import transformers
    except ImportError:
        raise ParameterError("tokenizer_source: union of differing vocabularies builds a tokenizer with "
                             "transformers: pip install 'nbmerge[hf]'") from None
    order = ([sources[base_index]] if base_index is not None else []) + [s for i, s in enumerate(sources)
                                                                           if i != base_index]
    base = order[0]
    if base.folder is None:
        raise ParameterError(f"tokenizer_source: union needs each model's tokenizer files; {base.label} is not a "
                             f"model folder")
    loaded = [(source, transformers.AutoTokenizer.from_pretrained(source.folder, use_fast=True)) for source in order
              if source.folder is not None and _has_tokenizer(source.folder)]  # as mergekit: no tokenizer, no tokens
    if not loaded or loaded[0][0] is not base:
        raise ParameterError(f"tokenizer_source: union needs the tokenizer files of {base.label}")
    scratch = tempfile.TemporaryDirectory(prefix="nbmerge-union-tokenizer-")
    loaded[0][1].save_pretrained(scratch.name)
    union = transformers.AutoTokenizer.from_pretrained(scratch.name, use_fast=True)
    base_vocabulary = loaded[0][1].get_vocab()
    plain, added = {}, {}
    for source, tokenizer in loaded:
        size = (_model_vocabulary(source, tokenizer.get_vocab()) or (None, tokenizer.vocab_size))[1]
        special = tokenizer.added_tokens_decoder
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size and token not in {info.content for info in special.values()}:
                plain.setdefault(token, len(plain))
        for index, info in sorted(special.items()):
            if index < size:
                added.setdefault(info.content, info)
    for token in plain:
        if token not in added and token not in base_vocabulary:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    union.save_pretrained(scratch.name)
    return union.get_vocab(), scratch, Path(scratch.name)


def _has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` has tokenizer files; each one transformers may read is checked first (inside the model's
    repository, a regular file of bounded size, JSON objects where JSON), since the union tokenizer it builds is
    written into the output."""
    check_model_files(folder, TOKENIZER_FILES, "tokenizer files")
    return any(model_file(folder, name) is not None for name in ("tokenizer.json", "tokenizer_config.json",
                                                                  "vocab.json"))


class VocabularyAlignment:
    """Every model's vocabulary tensors in the output's token order; one tensor name at a time, computed for all
    models together (the fills need the other models' rows) when the first of them reads it."""

    def __init__(self, sources: list[ModelSource], vocabularies: list[tuple[dict, int]], by_id: list,
                 base_index: int | None, token_count: int):
        self.sources, self.base_index = sources, base_index
        self.token_count = token_count  # the output's token ids; rows from it to len(by_id): padding
        self.sizes = [size for _, size in vocabularies]
        self.rows = torch.tensor([[table.get(token, -1) if token is not None else -1 for token in by_id]
                                  for table, _ in vocabularies], dtype=torch.long)  # models × |V|: -1 absent
        self._name, self._aligned = None, None

    @property
    def size(self) -> int:
        return self.rows.shape[1]

    def is_vocabulary_tensor(self, index: int, name: str, info: TensorInfo) -> bool:
        return layer_index(name) is None and len(info.shape) >= 1 and info.shape[0] == self.sizes[index]

    def aligned(self, name: str, index: int) -> torch.Tensor:
        if self._name != name:
            self._name, self._aligned = name, self._align(name)
        return self._aligned[index]

    def _align(self, name: str) -> list[torch.Tensor]:
        holders = [i for i, source in enumerate(self.sources) if name in source.infos
                   and self.is_vocabulary_tensor(i, name, source.infos[name])]
        tensors = {i: self.sources[i].read(name) for i in holders}
        present = self.rows[holders] >= 0  # holders × |V|
        count = present.sum(0)
        first = tensors[holders[0]]
        fill = torch.zeros((self.size, *first.shape[1:]), dtype=torch.float32)
        total = torch.zeros_like(fill)
        for position, i in enumerate(holders):
            has = present[position]
            total[has] += tensors[i][self.rows[i][has]].float()
        average = count >= 2
        fill[average] = total[average] / count[average].to(torch.float32).reshape(-1, *([1] * (fill.dim() - 1)))
        fill[count == 1] = total[count == 1]  # the one model's row
        if self.base_index in holders:
            from_base = average & (self.rows[self.base_index] >= 0)
            fill[from_base] = tensors[self.base_index][self.rows[self.base_index][from_base]].float()
        aligned = []
        for i in range(len(self.sources)):
            if i not in tensors:
                aligned.append(None)
                continue
            has = self.rows[i] >= 0
            rows = fill.to(tensors[i].dtype, copy=True)
            rows[has] = tensors[i][self.rows[i][has]]
            if self.token_count < self.size:  # padding: the mean of the model's aligned token rows
                rows[self.token_count:] = rows[:self.token_count].mean(0)
            aligned.append(rows)
        return aligned


class AlignedSource(SourceView):
    """``source`` with its vocabulary tensors in the output vocabulary's order and size."""

    def __init__(self, source: ModelSource, alignment: VocabularyAlignment, index: int):
        super().__init__(source)
        self.alignment, self.index = alignment, index
        self._vocabulary = {name for name, info in source.infos.items()
                            if alignment.is_vocabulary_tensor(index, name, info)}
        self.infos = {name: (TensorInfo(info.dtype, (alignment.size, *info.shape[1:])) if name in self._vocabulary
                             else info) for name, info in source.infos.items()}

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        if name in self._vocabulary:
            return self.alignment.aligned(name, self.index)
        return self.source.read(name, pool)

    def where(self, name: str) -> str:
        return self.source.where(name) + (" (rows permuted to the output vocabulary)" if name in self._vocabulary
                                          else "")
