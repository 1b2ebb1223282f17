"""The model card every output folder gets: a ``README.md`` that can be published on the Hugging Face Hub as it is.

Front matter (YAML): ``base_model`` (the Hub ids among the merged models, the base first; local paths are not
listed, as mergekit does), ``base_model_relation: merge`` when there are several, ``tags: [merge, nbmerge]``
(plus ``mergekit`` for a pasted mergekit recipe) and ``library_name: transformers`` when the folder has a
transformers config. Then the method with its formula, the models (the base named apart), the parameters, the
recipe exactly as the user gave it (also kept as a file: ``mergekit_config.yml`` for a mergekit recipe,
``nbmerge_recipe.yml`` for nbmerge's own YAML), a usage snippet, and evaluation results when there are any.

A Hub id is a reference of the form ``org/name`` that is not a local path, or a folder inside the Hugging Face
cache (``.../models--org--name/snapshots/<revision>``), which names its repository.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

CARD_FILE = "README.md"
RECIPE_FILES = {"mergekit": "mergekit_config.yml", "nbmerge": "nbmerge_recipe.yml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_CACHE_REPO = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+")
_DECODER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
                  "gpt2", "gpt_neox", "falcon", "olmo", "olmo2", "starcoder2", "stablelm", "granite", "smollm3"}
_AUTO_CLASS = {"ForCausalLM": "AutoModelForCausalLM", "ForSequenceClassification": "AutoModelForSequenceClassification",
               "ForMaskedLM": "AutoModelForMaskedLM", "ForImageClassification": "AutoModelForImageClassification"}


@dataclass(frozen=True)
class GivenRecipe:
    """A recipe as the user wrote it: its text, verbatim, and its format ("mergekit" or "nbmerge")."""

    text: str
    format: str

    @property
    def file_name(self) -> str:
        return RECIPE_FILES[self.format]


@dataclass(frozen=True)
class MethodLine:
    """One method the card describes: its name, one-line summary and formula (a layer stack has one per slice)."""

    name: str
    summary: str
    formula: str


def hub_id(reference: Any) -> str | None:
    """The Hugging Face Hub id ``reference`` names, or None for a local model or an in-memory one."""
    if not isinstance(reference, (str, Path)):
        return None
    text = str(reference)
    cached = _CACHE_REPO.search(text.replace("\\", "/"))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if _HUB_ID.match(text) and not Path(text).expanduser().exists() and ".." not in text:
        return text
    return None


@dataclass(frozen=True)
class CardSource:
    """What a merge tells its model card beyond the recipe: the methods it ran and the recipe as given."""

    methods: tuple[MethodLine, ...]
    given: GivenRecipe | None = None

    def files(self, recipe: dict, config: dict | None, title: str, evaluation: Any = None) -> dict[str, str]:
        """The files a model folder gets besides its tensors: ``README.md``, and the given recipe's own file."""
        files = {CARD_FILE: model_card(recipe, self.methods, config, title, self.given, evaluation)}
        if self.given is not None:
            files[self.given.file_name] = self.given.text
        return files


def method_line(method: Any) -> MethodLine:
    """A registered method's card line (a ``nbmerge.MergeMethod``)."""
    return MethodLine(method.name, method.summary, method.formula)


def model_card(recipe: dict, methods: Sequence[MethodLine], config: dict | None, title: str,
               given: GivenRecipe | None = None, evaluation: Any = None) -> str:
    """The README.md text (see the module docstring for what it holds)."""
    models, base = _recipe_models(recipe)
    hub_models = [hub for hub in (hub_id(m) for m in ([base] if base else []) + models) if hub]
    hub_models = list(dict.fromkeys(hub_models))
    front: dict[str, Any] = {}
    if hub_models:
        front["base_model"] = hub_models
        if len(hub_models) > 1:
            front["base_model_relation"] = "merge"
    front["tags"] = ["merge", "nbmerge"] + (["mergekit"] if given is not None and given.format == "mergekit" else [])
    if config and (config.get("architectures") or config.get("model_type")):
        front["library_name"] = "transformers"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip("\n"), "---", f"# {title}", "",
             "This model is a merge of pre-trained models made with "
             "[nbmerge](https://pypi.org/project/nbmerge/), without retraining.", "", "## Merge details", ""]
    for method in methods:
        lines += [f"- **{method.name}**: {method.summary}", f"  - formula: `{method.formula}`"]
    lines += ["", "### Models merged", ""]
    if base:
        lines.append(f"- base: {_link(base)}")
    lines += [f"- {_link(model)}" for model in models if model != base]
    params = recipe.get("params") or {}
    if params:
        lines += ["", "### Parameters", "", "```json", json.dumps(params, indent=2, sort_keys=True), "```"]
    lines += ["", "### Recipe", ""]
    if given is not None:
        lines += [f"The recipe as given (also in `{given.file_name}`):", "", *_fenced(given.text, "yaml")]
    else:
        lines += ["nbmerge's record of this merge (also in `nbmerge_recipe.json`):", "",
                  *_fenced(json.dumps(recipe, indent=2), "json")]
    lines += ["", "## Usage", "", *_fenced(_usage(config), "python")]
    if evaluation is not None:
        reports = evaluation if isinstance(evaluation, (list, tuple)) else [evaluation]
        lines += ["", "## Evaluation", ""]
        for report in reports:
            lines += [*_fenced(str(report), "text"), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _recipe_models(recipe: dict) -> tuple[list[str], str | None]:
    """The merged models' names and the base's, from a merge's recipe or from a layer stack's slices."""
    if "slices" in recipe:
        models: list[str] = []
        for piece in recipe["slices"]:
            models += [m for m in piece.get("models", []) if m not in models]
            if piece.get("base") and piece["base"] not in models:
                models.append(piece["base"])
        return models, None
    return [str(m) for m in recipe.get("models", [])], recipe.get("base")


def _link(reference: str) -> str:
    hub = hub_id(reference)
    return f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{reference}`"


def _fenced(text: str, language: str) -> list[str]:
    """A code fence longer than any run of backticks in ``text``, so the text is shown verbatim whatever it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + language, text.rstrip("\n"), fence]


def _usage(config: dict | None) -> str:
    architecture = ((config or {}).get("architectures") or [""])[0]
    auto = next((auto for suffix, auto in _AUTO_CLASS.items() if architecture.endswith(suffix)), "AutoModel")
    if not architecture and (config or {}).get("model_type") in _DECODER_TYPES:  # a config saved without it
        auto = "AutoModelForCausalLM"
    loading = [f"from transformers import {auto}, AutoTokenizer", "",
               'path = "path/to/this/folder"  # or its Hub id once published',
               f"model = {auto}.from_pretrained(path)"]
    if auto == "AutoModelForCausalLM":
        loading += ["tokenizer = AutoTokenizer.from_pretrained(path)",
                    'inputs = tokenizer("The capital of France is", return_tensors="pt")',
                    "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"]
    return "\n".join(loading)


def read_config(folder: Path | None) -> dict | None:
    """The folder's config.json as a dict, or None where it has none or it cannot be read."""
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
