"""Task pools for causal LMs: perplexity per domain of texts, and multiple-choice accuracy by log-likelihood.

- a domain d (``TextDomain``, a ``PerplexityTask``): perplexity_d = exp(Σ_texts Σ_{i≥1} −log p(t_i | t_<i) /
  Σ_texts (n_tokens − 1)), each text tokenized as the tokenizer does by default (special tokens included) and
  truncated to ``max_length`` tokens;
- a choice task (``ChoiceTask``, a classification ``Task``): for each item (prompt, choices, answer), the logit of
  choice c is Σ_j log p(c_j | prompt, c_<j), the choice's tokens scored after the prompt's (the choice tokenized
  without special tokens, its leading space kept); accuracy = 100 · mean(argmax = answer).

``lm_pool(base, texts=..., choices=...)`` builds a pool from the user's texts and items (one split, ``test`` by
default); ``smollm2_chat_pool()`` is the packaged one: held-out chat pairs of the two SmolLM2 fine-tunes' topic
slices (``lm_variants``) and general-knowledge prompts. ``load_encoder`` loads a model once per evaluation and
refuses weights that do not fit the config (``causal_lm.load_causal_lm``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from nbmerge.errors import ParameterError
from nbmerge.taskpool import PerplexityTask, Task, TaskPool
from nbmerge.workbench.models import causal_lm

ChoiceItem = tuple[str, Sequence[str], int]

# a second set of general-knowledge items, for the validation split of the packaged pool
VALIDATION_PROMPTS: tuple[ChoiceItem, ...] = (
    ("The color of a clear sky on a sunny day is", (" blue", " red", " black"), 0),
    ("A week has seven", (" days", " hours", " years"), 0),
    ("Fish live in", (" water", " trees", " deserts"), 0),
    ("The largest planet in our solar system is", (" Jupiter", " Mercury"), 0),
    ("We see with our", (" eyes", " ears", " feet"), 0),
    ("Monday, Tuesday,", (" Wednesday", " Sunday", " Friday"), 0),
)


class TextDomain(PerplexityTask):
    """Texts of one domain per split, scored by perplexity."""

    def __init__(self, name: str, splits: Mapping[str, Sequence[str]], tokenizer_folder: str | Path,
                 max_length: int = 128):
        self.name = name
        self._splits = {split: list(texts) for split, texts in splits.items()}
        self.tokenizer_folder = str(tokenizer_folder)
        self.max_length = max_length
        for split, texts in self._splits.items():
            if not texts or not all(isinstance(text, str) for text in texts):
                raise ParameterError(f"domain {name!r}: the {split} split must be a non-empty list of strings")

    def texts(self, split: str) -> list[str]:
        return list(_split_of(self.name, self._splits, split))

    def token_ids(self, split: str) -> list[list[int]]:
        tokenizer = causal_lm.tokenizer_of(self.tokenizer_folder)
        return [tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
                for text in self.texts(split)]

    def negative_log_likelihood(self, model: torch.nn.Module, split: str) -> tuple[float, int]:
        ids = [row for row in self.token_ids(split) if len(row) >= 2]
        if not ids:
            raise ParameterError(f"domain {self.name!r}: no text of the {split} split has two tokens to score")
        return sum(causal_lm.text_nll(model, row) for row in ids), sum(len(row) - 1 for row in ids)


class ChoiceTask(Task):
    """Multiple-choice items per split: (prompt, choices, index of the right choice)."""

    def __init__(self, name: str, splits: Mapping[str, Sequence[ChoiceItem]], tokenizer_folder: str | Path):
        self.name = name
        self._splits = {split: [_checked_item(name, item) for item in items] for split, items in splits.items()}
        self.tokenizer_folder = str(tokenizer_folder)
        widest = max(len(item[1]) for items in self._splits.values() for item in items)
        self.classes = tuple(chr(ord("A") + i) for i in range(widest))

    def inputs(self, split: str) -> list[ChoiceItem]:
        return list(_split_of(self.name, self._splits, split))

    def labels(self, split: str) -> torch.Tensor:
        return torch.tensor([answer for _, _, answer in self.inputs(split)], dtype=torch.long)

    def logits(self, model: torch.nn.Module, inputs: Sequence[ChoiceItem]) -> torch.Tensor:
        """[items, widest] summed log-likelihoods; −inf where an item has fewer choices."""
        tokenizer = causal_lm.tokenizer_of(self.tokenizer_folder)
        scores = torch.full((len(inputs), len(self.classes)), float("-inf"), dtype=torch.float64)
        for row, (prompt, choices, _) in enumerate(inputs):
            context = tokenizer(prompt)["input_ids"]
            for column, choice in enumerate(choices):
                continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
                scores[row, column] = causal_lm.continuation_log_likelihood(model, context, continuation)
        return scores


def _checked_item(task: str, item: Any) -> ChoiceItem:
    try:
        prompt, choices, answer = item
        ok = (isinstance(prompt, str) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
              and isinstance(answer, int) and 0 <= answer < len(choices))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"choice task {task!r}: an item must be (prompt, [two or more non-empty choices], index "
                             f"of the right choice), got {item!r}")
    return prompt, tuple(choices), answer


def _split_of(task: str, splits: Mapping[str, list], split: str) -> list:
    if split not in splits:
        raise ParameterError(f"task {task!r} has no {split!r} split (its splits: {', '.join(splits)})")
    return splits[split]


class CausalLMPool(TaskPool):
    """Tasks scored on one causal-LM architecture. ``base``: the folder whose config and tokenizer score every
    model that is not a folder of its own (a merge held in memory); a folder is loaded with its own config."""

    def __init__(self, name: str, base: str | Path, tasks: Sequence[Task | PerplexityTask],
                 individual: Mapping[str, Any] | None = None):
        if not tasks:
            raise ParameterError(f"task pool {name!r}: give texts to score perplexity on or multiple-choice items")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ParameterError(f"task pool {name!r}: task names must differ, got {', '.join(names)}")
        self.name = name
        self.base = Path(base)
        self.tasks = list(tasks)
        self._individual = dict(individual or {})

    def individual_models(self) -> dict[str, Any]:
        return dict(self._individual)

    @cached_property
    def tokenizer(self):
        return causal_lm.tokenizer_of(str(self.base))

    def load_encoder(self, model: Any) -> torch.nn.Module:
        return causal_lm.load_causal_lm(model, self.base)


def lm_pool(base: str | Path, texts: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
            choices: Sequence[ChoiceItem] | Mapping[str, Sequence[ChoiceItem]] | None = None, *,
            name: str = "causal-lm", split: str = "test", individual: Mapping[str, Any] | None = None,
            max_length: int = 128) -> CausalLMPool:
    """A causal-LM task pool from your texts and items, for ``nbmerge.evaluate`` / ``%merge_eval``.

    base: a Hugging Face folder (config and tokenizer). texts: a list (one domain, ``texts``) or {domain: list};
    each domain's perplexity is reported. choices: a list of (prompt, choices, answer index) items (one task,
    ``choices``) or {task: items}; scored by accuracy. split: the split name the data is filed under.
    """
    tasks: list[Task | PerplexityTask] = []
    if texts is not None:
        domains = {"texts": texts} if not isinstance(texts, Mapping) else texts
        tasks += [TextDomain(domain, {split: list(values) if not isinstance(values, str) else [values]}, base,
                             max_length) for domain, values in domains.items()]
    if choices is not None:
        sets = {"choices": choices} if not isinstance(choices, Mapping) else choices
        tasks += [ChoiceTask(task, {split: list(items)}, base) for task, items in sets.items()]
    return CausalLMPool(name, base, tasks, individual)


def smollm2_chat_pool(texts_per_domain: int = 16, seed: int = 0, cache_dir: str | Path | None = None,
                      progress: bool = True) -> CausalLMPool:
    """The packaged pool: SmolLM2-135M-Instruct (``base``) and its two chat fine-tunes (``individual``), scored by
    perplexity on held-out pairs of each fine-tune's topic slice (``sft_topics``, ``aligned_topics``; even-numbered
    held-out pairs for validation, odd-numbered for test, ``texts_per_domain`` of each) and by accuracy on
    general-knowledge prompts (``prompts``; a second set for validation). Builds the fine-tunes on first use."""
    from nbmerge.workbench.models.lm_variants import Recipe, build_variants

    variants = build_variants(Recipe(seed=seed), cache_dir=cache_dir, progress=progress)
    base = variants.base
    tasks: list[Task | PerplexityTask] = [
        TextDomain(f"{slice_}_topics", {"validation": texts[0::2][:texts_per_domain],
                                        "test": texts[1::2][:texts_per_domain]}, base)
        for slice_, texts in variants.heldout.items()]
    tasks.append(ChoiceTask("prompts", {"validation": VALIDATION_PROMPTS, "test": causal_lm.PROMPTS}, base))
    return CausalLMPool("smollm2-chat", base, tasks, {"sft_topics": variants.sft, "aligned_topics": variants.aligned})
