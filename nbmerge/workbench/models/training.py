"""What the zoos share when they build fine-tuned models: seeded class-balanced splits, a linear head fitted on
fixed features (the fine-tuning's starting point), and the seeded order of training batches."""

from __future__ import annotations

import random
from typing import Iterator

import torch

from nbmerge.errors import NBMergeError

SPLITS = ("train", "validation", "test")


def balanced_splits(data, cap: int, seed: int,
                    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)) -> dict[str, list[int]]:
    """Indices of a seeded, class-balanced train/validation/test split of at most ``cap`` examples.

    Each class keeps ``per_class = min(smallest class size, cap // n_classes)`` examples; of those,
    ``round(per_class · f)`` go to train and validation, the rest to test. Within a split, examples are shuffled.
    """
    by_class: dict[int, list[int]] = {c: [] for c in range(len(data.classes))}
    for index, label in enumerate(data.labels):
        by_class[label].append(index)
    per_class = min(min(len(v) for v in by_class.values()), cap // len(data.classes))
    if per_class < 4:
        raise NBMergeError(f"task {data.name!r}: only {per_class} examples per class; need at least 4")
    rng = random.Random(f"{data.name}:{seed}")
    n_train = max(1, round(per_class * fractions[0]))
    n_validation = max(1, round(per_class * fractions[1]))
    splits: dict[str, list[int]] = {split: [] for split in SPLITS}
    for members in by_class.values():
        chosen = rng.sample(members, per_class)
        splits["train"] += chosen[:n_train]
        splits["validation"] += chosen[n_train:n_train + n_validation]
        splits["test"] += chosen[n_train + n_validation:]
    for indices in splits.values():
        rng.shuffle(indices)
    return splits


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, iterations: int) -> torch.nn.Linear:
    """Multinomial logistic regression (L2 1e-3) on fixed features: the fine-tuning's starting head."""
    head = torch.nn.Linear(features.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def loss_closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), labels) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(loss_closure)
    return head


def batch_order(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into ``count`` examples: seeded permutations, taken ``batch_size`` at a time
    (a batch may span two permutations)."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(count), count)
        batch, order = order[:batch_size], order[batch_size:]
        yield batch
