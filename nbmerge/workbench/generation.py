"""Side-by-side generations: the same prompts through several causal LMs (the base, the fine-tunes, the merges).

Each prompt is written as a one-turn user conversation with the tokenizer's chat template (with the generation
prompt) when the tokenizer has one and ``chat=True``, else used as is; decoding is greedy (``seed=None``: the
argmax token at each step, deterministic) or sampled (``temperature``, ``top_p``) with the torch generator seeded
with ``seed`` before each (model, prompt), so a cell does not depend on which models ran before it. Each model is
loaded once (``causal_lm.load_causal_lm``: its own config when it is a folder, else ``tokenizer``'s folder's,
with the same refusal of weights that do not fit), its prompts generated one by one, then released.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nbmerge.engine.progress import ProgressEvent, check_cancel
from nbmerge.errors import ParameterError
from nbmerge.results import labelled_models
from nbmerge.workbench.models import causal_lm


@dataclass
class GenerationTable:
    """Replies per model to the same prompts: ``texts[label][i]`` answers ``prompts[i]``. ``rows`` holds one dict
    per prompt ({"prompt": ..., label: reply, ...}), the shape ``pandas.DataFrame(table.rows)`` takes."""

    prompts: list[str]
    texts: dict[str, list[str]]
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.texts)

    @property
    def rows(self) -> list[dict[str, str]]:
        return [{"prompt": prompt, **{label: replies[i] for label, replies in self.texts.items()}}
                for i, prompt in enumerate(self.prompts)]

    def __str__(self) -> str:
        lines = [f"generations ({_settings_text(self.settings)})"]
        for row in self.rows:
            lines.append(f"prompt: {row['prompt']}")
            lines += [f"  {label}: {row[label]!r}" for label in self.labels]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{escape(label)}</th>" for label in self.labels)
        body = "".join("<tr><td style='text-align:left'><b>" + escape(row["prompt"]) + "</b></td>"
                       + "".join(f"<td style='text-align:left;white-space:pre-wrap'>{escape(row[label])}</td>"
                                 for label in self.labels) + "</tr>" for row in self.rows)
        return (f"<table><caption>generations ({escape(_settings_text(self.settings))})</caption><thead><tr>"
                f"<th>prompt</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def _settings_text(settings: dict) -> str:
    decoding = "greedy" if settings.get("seed") is None else (
        f"sampled, seed {settings['seed']}, temperature {settings.get('temperature')}, top_p {settings.get('top_p')}")
    chat = ", chat template" if settings.get("chat") else ""
    return f"{decoding}, up to {settings.get('max_new_tokens')} new tokens{chat}"


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """The token ids a prompt is generated from: the chat template's one-turn conversation (with the generation
    prompt) when the tokenizer has a template and ``chat``, else the prompt tokenized as is."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def generate(model: Any, prompts: Sequence[str] | str, *, tokenizer: str | Path | None = None,
             max_new_tokens: int = 48, seed: int | None = None, temperature: float = 0.7, top_p: float = 0.9,
             chat: bool = True) -> list[str]:
    """The replies of one model to ``prompts`` (see ``compare_generations`` for the arguments)."""
    table = compare_generations({"model": model}, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                seed=seed, temperature=temperature, top_p=top_p, chat=chat)
    return table.texts["model"]


def compare_generations(models: Sequence[Any] | Mapping[str, Any], prompts: Sequence[str] | str, *,
                        tokenizer: str | Path | None = None, max_new_tokens: int = 48, seed: int | None = None,
                        temperature: float = 0.7, top_p: float = 0.9, chat: bool = True,
                        on_progress: Callable[[ProgressEvent], None] | None = None, cancel=None) -> GenerationTable:
    """The same prompts through each model, as a ``GenerationTable`` (a table in notebooks).

    models: {label: model} or a list (folders, state dicts, MergeResults, modules). tokenizer: the folder whose
    tokenizer (and config, for models without their own) is used; default: the first model that is a folder.
    seed: None for greedy decoding, else sampling with ``temperature`` and ``top_p``, seeded per (model, prompt).
    on_progress: a ProgressEvent (phase "generate", ``done``/``total`` replies, ``tensor`` = the model's label)
    before each reply and after the last; cancel: a threading.Event checked between replies.
    """
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise ParameterError("compare_generations: give one or more non-empty prompts")
    if max_new_tokens < 1:
        raise ParameterError(f"compare_generations: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    named = labelled_models(models) if not isinstance(models, Mapping) else [(str(k), v) for k, v in models.items()]
    folder = Path(tokenizer) if tokenizer is not None else _first_folder(named)
    tok = causal_lm.tokenizer_of(str(folder))
    settings = {"max_new_tokens": max_new_tokens, "seed": seed, "chat": chat and bool(tok.chat_template)}
    if seed is not None:
        settings.update(temperature=temperature, top_p=top_p)
    table = GenerationTable(prompts, {}, settings)
    total, done = len(named) * len(prompts), 0
    for label, model in named:
        started = time.perf_counter()
        module = causal_lm.load_causal_lm(model, folder)
        replies = []
        for prompt in prompts:
            check_cancel(cancel, f"before generating with {label}")
            if on_progress is not None:
                on_progress(ProgressEvent("generate", done, total, label))
            replies.append(_reply(module, tok, prompt, settings))
            done += 1
        table.texts[label] = replies
        table.seconds[label] = round(time.perf_counter() - started, 2)
        del module
    if on_progress is not None:
        on_progress(ProgressEvent("generate", total, total, ""))
    return table


def _reply(module: torch.nn.Module, tokenizer, prompt: str, settings: dict) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, prompt, settings["chat"])])
    options: dict[str, Any] = {"do_sample": False}
    if settings["seed"] is not None:
        torch.manual_seed(settings["seed"])
        options = {"do_sample": True, "temperature": settings["temperature"], "top_p": settings["top_p"], "top_k": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=settings["max_new_tokens"], pad_token_id=pad, **options)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _first_folder(named: list[tuple[str, Any]]) -> Path:
    for _, model in named:
        folder = causal_lm.config_folder_of(model, "")
        if str(folder) not in ("", ".") and (folder / "tokenizer_config.json").is_file():
            return folder
    raise ParameterError("compare_generations: no model is a folder with a tokenizer; pass tokenizer=FOLDER")
