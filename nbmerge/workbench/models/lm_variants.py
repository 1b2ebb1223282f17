"""A real SFT → aligned pair of causal LMs, fine-tuned on this machine from SmolLM2-135M-Instruct and cached, so
that the LLM recipes (ExPO, backbone-only averaging, SLERP over depth) run on real checkpoints of one lineage.

Data: the English dialogues of ``chatterbot-corpus`` (a workbench dependency, its YAML files read directly), as
(line, reply) pairs of consecutive lines, written in the model's chat format (ChatML, no system turn):
``<|im_start|>user\\n{line}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n``. Two disjoint slices of
topics; each slice keeps a seeded held-out part (``Variants.heldout``) that no training step sees.

- ``sft``: the instruct model (``causal_lm.smollm2()``), every weight trained, ``sft_steps`` AdamW steps on the
  ``SFT_TOPICS`` pairs, next-token loss on every token;
- ``aligned``: ``sft`` trained further, ``aligned_steps`` steps on the ``ALIGNED_TOPICS`` pairs, loss on the
  assistant's reply only (another slice, another objective).

One torch thread and a fixed seed: the same seed gives bit-identical weights. Saved in bfloat16 like the export
(tied embeddings, no ``lm_head`` tensor) as Hugging Face Llama folders under
``<cache>/smollm2-variants-<recipe>/{sft,aligned}``, built once (``nbmerge.workbench.models.cache.build_once``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nbmerge.engine.stream import torch_threads
from nbmerge.workbench.models.cache import build_once, default_cache_dir
from nbmerge.workbench.models.textdata import chat_conversations, chat_folder

VARIANTS_VERSION = 2  # 2: copies the v2 export's config (with its architecture)
SFT_TOPICS = ("ai", "botprofile", "computers", "conversations", "emotion", "food", "gossip", "greetings", "humor")
ALIGNED_TOPICS = ("history", "literature", "money", "movies", "politics", "psychology", "science", "sports",
                  "trivia")
HELDOUT_FRACTION = 0.15
TURN = "<|im_start|>user\n{line}<|im_end|>\n<|im_start|>assistant\n"
REPLY = "{reply}<|im_end|>\n"


@dataclass(frozen=True)
class Recipe:
    """How the variants are trained (the cache folder's name carries all of it)."""

    seed: int = 0
    sft_steps: int = 14
    aligned_steps: int = 10
    batch_size: int = 6
    max_length: int = 40
    lr: float = 1e-4

    def folder_name(self) -> str:
        return (f"smollm2-variants-seed{self.seed}-sft{self.sft_steps}-al{self.aligned_steps}-b{self.batch_size}"
                f"-t{self.max_length}-lr{self.lr:g}-v{VARIANTS_VERSION}")


@dataclass(frozen=True)
class Variants:
    """The built pair: ``base`` (the instruct export), ``sft`` and ``aligned`` folders, and per slice the held-out
    dialogue texts (``heldout["sft"]``, ``heldout["aligned"]``) to score perplexity on."""

    root: Path
    base: Path
    sft: Path
    aligned: Path
    heldout: dict[str, list[str]]
    record: dict


def dialogue_pairs(topics: tuple[str, ...]) -> list[tuple[str, str]]:
    """(line, reply) for every two consecutive lines of every English dialogue of ``topics``, in file order."""
    pairs = []
    for topic in topics:
        for conversation in _conversations(chat_folder() / "english" / f"{topic}.yml"):
            pairs += [(conversation[i], conversation[i + 1]) for i in range(0, len(conversation) - 1, 2)]
    return pairs


def _conversations(path: Path) -> list[list[str]]:
    """The file's conversations with each line's whitespace collapsed."""
    return [[" ".join(line.split()) for line in conversation] for conversation in chat_conversations(path)]


def chat_text(line: str, reply: str) -> str:
    return TURN.format(line=line) + REPLY.format(reply=reply)


def split_pairs(pairs: list[tuple[str, str]], seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, HELDOUT_FRACTION of the pairs held out."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    cut = round(len(pairs) * HELDOUT_FRACTION)
    return [pairs[i] for i in order[cut:]], [pairs[i] for i in order[:cut]]


def build_variants(recipe: Recipe | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                   base: str | Path | None = None) -> Variants:
    """The sft and aligned variants for ``recipe``: loaded from the cache, or trained (about a minute) and cached.

    base: the instruct model's folder (default: ``causal_lm.smollm2()`` in the same cache).
    """
    from nbmerge.workbench.models.causal_lm import smollm2

    recipe = recipe or Recipe()
    cache = Path(cache_dir or default_cache_dir())
    base = Path(base) if base is not None else smollm2(cache)
    root = build_once(cache / recipe.folder_name(), "variants.json",
                      lambda staging: _build(staging, base, recipe, progress))
    record = json.loads((root / "variants.json").read_text())
    return Variants(root, base, root / "sft", root / "aligned", record["heldout"], record)


def _build(staging: Path, base: Path, recipe: Recipe, progress: bool) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from nbmerge.workbench.models.causal_lm import load_causal_lm

    started = time.perf_counter()
    with torch_threads(1):  # bit-identical given the seed, and the machine's other core stays free
        tokenizer = AutoTokenizer.from_pretrained(base)
        sft_train, sft_heldout = split_pairs(dialogue_pairs(SFT_TOPICS), recipe.seed)
        aligned_train, aligned_heldout = split_pairs(dialogue_pairs(ALIGNED_TOPICS), recipe.seed + 1)
        model = load_causal_lm(base, base)
        bar = tqdm(total=recipe.sft_steps + recipe.aligned_steps, desc="nbmerge SmolLM2 variants", unit="step",
                   disable=not progress)
        losses = {}
        for name, pairs, steps, reply_only in (("sft", sft_train, recipe.sft_steps, False),
                                               ("aligned", aligned_train, recipe.aligned_steps, True)):
            bar.set_postfix_str(name)
            losses[name] = _train(model, tokenizer, pairs, steps, reply_only, recipe, bar)
            _save(model, staging / name, base)
        bar.close()
        record = {"recipe": asdict(recipe), "version": VARIANTS_VERSION, "losses": losses,
                  "train_pairs": {"sft": len(sft_train), "aligned": len(aligned_train)},
                  "heldout": {"sft": [chat_text(*p) for p in sft_heldout],
                              "aligned": [chat_text(*p) for p in aligned_heldout]},
                  "build_seconds": round(time.perf_counter() - started, 1)}
        (staging / "variants.json").write_text(json.dumps(record, indent=1))


def _batch(tokenizer, pairs: list[tuple[str, str]], reply_only: bool, max_length: int) -> dict:
    """Token ids, attention mask and labels (-100 where no loss is taken: padding, and the turn when reply_only)."""
    rows = []
    for line, reply in pairs:
        turn = tokenizer(TURN.format(line=line), add_special_tokens=False)["input_ids"]
        answer = tokenizer(REPLY.format(reply=reply), add_special_tokens=False)["input_ids"]
        ids = (turn + answer)[:max_length]
        labels = ([-100] * len(turn) if reply_only else turn) + answer
        rows.append((ids, labels[:max_length]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])}


def _train(model, tokenizer, pairs, steps: int, reply_only: bool, recipe: Recipe, bar) -> list[float]:
    """``steps`` AdamW steps over seeded batches of ``pairs``; returns the loss of each step."""
    torch.manual_seed(recipe.seed)
    order_rng = random.Random(f"{recipe.seed}:{reply_only}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    model.train()
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < recipe.batch_size:
            order += order_rng.sample(range(len(pairs)), len(pairs))
        chosen, order = order[:recipe.batch_size], order[recipe.batch_size:]
        loss = model(**_batch(tokenizer, [pairs[i] for i in chosen], reply_only, recipe.max_length)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 4))
        bar.update(1)
    model.eval()
    return losses


def _save(model, folder: Path, base: Path) -> None:
    """The model in bfloat16 as the export is laid out (tied lm_head left out), with the base's config and
    tokenizer files; the module keeps the rounded weights, so that training on continues from what was saved."""
    import shutil

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    tied = model.config.tie_word_embeddings
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    for file in base.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            shutil.copy2(file, folder / file.name)
