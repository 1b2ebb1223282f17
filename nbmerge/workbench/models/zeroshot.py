"""Frozen zero-shot heads on a sentence encoder, as CLIP's protocol uses them (FusionBench's TA8).

The features of a text are the encoder's sentence embedding, as all-MiniLM-L6-v2 was trained: the mean of the last
hidden states over the attention mask, L2-normalised,  f(x) = m / ‖m‖,  m = Σ_t a_t h_t / Σ_t a_t.

A task's head is built once from the *pretrained* encoder and never trained: for class c, each template of
``TEMPLATES`` filled with the class's name is embedded (f), the embeddings are averaged and normalised again,
giving e_c; logits_c(x) = SCALE · cos(f(x), e_c) = (SCALE · e_c) · f(x). It is stored as a bias-free
``torch.nn.Linear`` with weight SCALE · E, so the pretrained, the fine-tuned and every merged encoder are scored by
the same frozen head.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.nn import functional as F

from nbmerge.workbench.models.textpool import TextTask, TextTaskPool

SCALE = 20.0  # all-MiniLM-L6-v2's training scale (sentence-transformers' MultipleNegativesRankingLoss)
TEMPLATES = ("{label}", "This text is about {label}.", "{label} text", "A text about {label}.")


def sentence_embedding(encoder: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """f(x): masked mean of the last hidden states, L2-normalised; [batch, hidden]."""
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def zero_shot_head(encoder: torch.nn.Module, tokenizer, class_names: Sequence[str], max_length: int,
                   templates: Sequence[str] = TEMPLATES, scale: float = SCALE) -> torch.nn.Linear:
    """The frozen head: weight row c = scale · normalise(mean over templates of f(template(class c)))."""
    rows = []
    with torch.inference_mode():
        for name in class_names:
            prompts = [template.format(label=name) for template in templates]
            batch = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(F.normalize(sentence_embedding(encoder, batch).mean(0), dim=-1))
    head = torch.nn.Linear(len(rows[0]), len(rows), bias=False)
    with torch.no_grad():
        head.weight.copy_(scale * torch.stack(rows))
    return head.requires_grad_(False)


class ZeroShotTextTask(TextTask):
    """A text task scored through a frozen zero-shot head on the normalised mean-pooled sentence embedding."""

    def features(self, encoder: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sentence_embedding(encoder, batch)


class ZeroShotTextTaskPool(TextTaskPool):
    """Text tasks with zero-shot heads: the base scored through them is the zero-shot model (bench row
    ``zero_shot``)."""

    base_label = "zero_shot"
