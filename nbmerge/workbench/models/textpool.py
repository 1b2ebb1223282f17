"""Text-classification tasks on a BERT-style encoder: tokenised splits, CLS pooling and one linear head per task.

logits(x) = W_task · h_CLS(x) + b_task, where h_CLS is the encoder's last hidden state at the [CLS] token. Every
model evaluated on a pool shares the pool's heads and tokenizer; only the encoder weights differ.
"""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from nbmerge.method import check_fits
from nbmerge.method.tensor_names import count_layers
from nbmerge.results import MergeResult
from nbmerge.taskpool import Task, TaskPool
from nbmerge.workbench.models.statedicts import state_dict_of
from nbmerge.workbench.models.training import SPLITS

EVAL_BATCH = 64


class TextTask(Task):
    """A task whose inputs are strings; ``head`` maps CLS features to class logits."""

    def __init__(self, name: str, classes: Sequence[str], splits: Mapping[str, tuple[list[str], list[int]]],
                 head: torch.nn.Linear, tokenizer, max_length: int):
        self.name = name
        self.classes = tuple(classes)
        self._splits = splits
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._encoded: dict[str, dict] = {}

    def inputs(self, split: str) -> list[str]:
        return list(self._split(split)[0])

    texts = inputs

    def labels(self, split: str) -> torch.Tensor:
        return torch.tensor(self._split(split)[1], dtype=torch.long)

    def _split(self, split: str):
        if split not in self._splits:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return self._splits[split]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def features(self, encoder: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """CLS features h_CLS for a tokenised batch."""
        return encoder(**batch).last_hidden_state[:, 0]

    def logits(self, encoder: torch.nn.Module, inputs: Sequence[str]) -> torch.Tensor:
        return self.head(self.features(encoder, self.tokenize(inputs)))

    def predict(self, encoder: torch.nn.Module, split: str) -> torch.Tensor:
        """Predictions for a whole split, in length-sorted batches (little padding), in the split's order."""
        batches = self._length_sorted_batches(split)
        predictions = torch.empty(len(self._split(split)[0]), dtype=torch.long)
        with torch.inference_mode():
            for order, batch in batches:
                predictions[order] = self.head(self.features(encoder, batch)).argmax(-1)
        return predictions

    def _length_sorted_batches(self, split: str):
        if split not in self._encoded:
            texts = self.inputs(split)
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
            batches = []
            for start in range(0, len(order), EVAL_BATCH):
                chunk = order[start:start + EVAL_BATCH]
                padded = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
                batches.append((torch.tensor(chunk), dict(padded)))
            self._encoded[split] = batches
        return self._encoded[split]


class TextTaskPool(TaskPool):
    """Tasks sharing one encoder architecture (``base`` folder: config, tokenizer, pretrained weights)."""

    any_depth = True

    def __init__(self, name: str, base: Path, tasks: list[TextTask], individual: Mapping[str, Path]):
        self.name = name
        self.base = Path(base)
        self.tasks = tasks
        self._individual = dict(individual)

    def individual_models(self) -> dict[str, Path]:
        return dict(self._individual)

    @cached_property
    def _config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.base)

    @cached_property
    def _templates(self) -> dict[int, torch.nn.Module]:
        return {}

    def _template(self, layers: int | None = None) -> torch.nn.Module:
        """The encoder architecture with the base's config, or with ``layers`` layers (a layer stack's count)."""
        from transformers import AutoModel

        layers = layers or self._config.num_hidden_layers
        if layers not in self._templates:
            config = copy.deepcopy(self._config)
            config.num_hidden_layers = layers
            self._templates[layers] = AutoModel.from_config(config, add_pooling_layer=False).eval()
        return self._templates[layers]

    def load_encoder(self, model: Any) -> torch.nn.Module:
        """An encoder module (eval mode) from a folder/.safetensors path, a state dict, a MergeResult or a module.

        State dicts may carry extra entries (a pooler, buffers); every weight the encoder needs must be present.
        A state dict with another number of layers (a layer stack) gets an encoder of that depth. A MergeResult of
        a module-building method is its module.
        """
        if isinstance(model, MergeResult) and model.module is not None:
            model = model.module
        if isinstance(model, torch.nn.Module):
            return model
        state_dict = state_dict_of(model)
        encoder = copy.deepcopy(self._template(count_layers(state_dict)))
        wanted = encoder.state_dict()
        check_fits(state_dict, {key: value.shape for key, value in wanted.items()},
                   f"model for task pool {self.name!r}", noun="encoder weight",
                   hint=f": is it a {type(encoder).__name__} checkpoint?")
        encoder.load_state_dict({key: state_dict[key] for key in wanted})
        return encoder.eval()
