"""A model with a PEFT LoRA adapter applied, read tensor by tensor: mergekit's ``model+adapter`` reference.

For each module the adapter adapts (``<module>.lora_A.weight`` A: r × in, ``<module>.lora_B.weight`` B: out × r),
the model's ``<module>.weight`` W is read as
  W + s · B A            (an embedding: W + s · (B A)ᵀ, from ``lora_embedding_A`` r × vocab, ``lora_embedding_B``)
  s = α / r, or α / √r with ``use_rslora``; α = ``lora_alpha``, or the ``alpha_pattern`` entry matching the module
with the product taken in float32 and added in W's dtype, as PEFT's ``merge_and_unload`` does (what mergekit
runs). Tensors the adapter stores whole (``modules_to_save``, and embeddings saved with the adapter) replace the
model's. Adapters this does not apply exactly — DoRA, LoRA biases, ``fan_in_fan_out`` layers, convolutions,
other PEFT types — are refused with the field or tensor named; so is an adapter tensor that matches no tensor of
the model or does not fit its shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbmerge.errors import ModelInputError, shown
from nbmerge.io.buffers import BufferPool
from nbmerge.io.module_patterns import UnsupportedPattern, compile_pattern, first_match
from nbmerge.io.sources import ModelSource, TensorInfo
from nbmerge.io.untrusted import in_repository, load_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
UNSUPPORTED_FLAGS = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "fan_in_fan_out": "fan_in_fan_out layers",
                     "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA"}


@dataclass(frozen=True)
class WithLora:
    """A model with a LoRA adapter folder applied (what ``nbmerge.merge`` and recipes' ``model+adapter`` take)."""

    model: Any
    adapter: Any

    @property
    def reference(self) -> str | None:
        """``model+adapter`` where the model is a path (how recipes name it), else None."""
        return f"{self.model}+{self.adapter}" if isinstance(self.model, (str, Path)) else None

    def open_source(self, label: str) -> "LoraSource":
        """What ``open_model`` calls: the model opened with its adapter applied."""
        return open_with_lora(self, label)


@dataclass(frozen=True)
class LowRankUpdate:
    """One module's update: s · B A (``transpose``: s · (B A)ᵀ, an embedding)."""

    down: str  # the adapter tensor A
    up: str  # the adapter tensor B
    scale: float
    transpose: bool


class LoraSource(ModelSource):
    """``base`` with ``adapter`` (an opened adapter weights source) applied; closes both."""

    def __init__(self, base: ModelSource, adapter: ModelSource, config: dict, adapter_folder: Path):
        self.base, self.adapter = base, adapter
        self.label = f"{base.label}+{adapter_folder.name}"
        self.folder = base.folder
        self.infos = dict(base.infos)
        self._updates: dict[str, LowRankUpdate] = {}
        self._replaced: dict[str, str] = {}
        _check_config(config, adapter_folder)
        where = f"LoRA adapter {adapter_folder}"
        pairs: dict[str, dict[str, str]] = {}
        for key in adapter.infos:
            module, kind = _split_key(key, where)
            if kind in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"):
                pairs.setdefault(module, {})[kind] = key
            else:  # stored whole: modules_to_save, or an embedding saved with the adapter
                self._replace(module + "." + kind.removeprefix("base_layer."), key, where)
        for module, found in pairs.items():
            self._pair(module, found, config, where)

    def _replace(self, name: str, key: str, where: str) -> None:
        if name not in self.base.infos:
            raise ModelInputError(f"{where}: tensor {shown(key)} replaces {shown(name)}, which {self.base.label} does not have")
        if self.adapter.infos[key].shape != self.base.infos[name].shape:
            raise ModelInputError(f"{where}: tensor {shown(key)} has shape {self.adapter.infos[key].shape}, but "
                                  f"{shown(name)} of {self.base.label} has {self.base.infos[name].shape}")
        self._replaced[name] = key
        self.infos[name] = TensorInfo(self.base.infos[name].dtype, self.base.infos[name].shape)

    def _pair(self, module: str, found: dict[str, str], config: dict, where: str) -> None:
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        down_kind, up_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight",
                                                                                         "lora_B.weight")
        if set(found) != {down_kind, up_kind}:
            raise ModelInputError(f"{where}: module {shown(module)} has {', '.join(sorted(found))} but not both "
                                  f"{down_kind} and {up_kind}")
        down, up = self.adapter.infos[found[down_kind]], self.adapter.infos[found[up_kind]]
        name = module + ".weight"
        if name not in self.base.infos:
            raise ModelInputError(f"{where}: tensor {shown(found[down_kind])} adapts {shown(name)}, which {self.base.label} "
                                  f"does not have")
        if len(down.shape) != 2 or len(up.shape) != 2:
            raise ModelInputError(f"{where}: tensor {shown(found[down_kind])} has shape {down.shape}; only linear and "
                                  f"embedding LoRA (2-D A and B) is applied, not convolutions")
        rank = down.shape[0]
        if rank == 0:
            raise ModelInputError(f"{where}: tensor {shown(found[down_kind])} has rank 0 (shape {down.shape}); "
                                  f"a LoRA update needs rank r ≥ 1")
        declared = first_match(config.get("rank_pattern") or {}, module, f"{where}: rank_pattern")
        declared = config.get("r") if declared is None else declared
        if declared is not None and declared != rank:
            raise ModelInputError(f"{where}: module {shown(module)} has rank {rank} in its tensors, but the config "
                                  f"declares r = {shown(declared)} (r / rank_pattern); PEFT would not load it")
        product = (up.shape[0], down.shape[1])
        expected = product[::-1] if embedding else product
        if up.shape[1] != rank or tuple(self.base.infos[name].shape) != expected:
            raise ModelInputError(f"{where}: {shown(found[up_kind])} {up.shape} × {shown(found[down_kind])} {down.shape} does "
                                  f"not give the shape of {shown(name)} {self.base.infos[name].shape}")
        alpha = first_match(config.get("alpha_pattern") or {}, module, f"{where}: alpha_pattern")
        alpha = config.get("lora_alpha", 8) if alpha is None else alpha
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        self._updates[name] = LowRankUpdate(found[down_kind], found[up_kind], scale, embedding)

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        weight = self.adapter.read(self._replaced[name]) if name in self._replaced else self.base.read(name, pool)
        update = self._updates.get(name)
        if update is None:
            return weight
        delta = self.adapter.read(update.up).float() @ self.adapter.read(update.down).float()
        delta = (delta.T if update.transpose else delta) * update.scale
        return weight + delta.to(weight.dtype)

    def where(self, name: str) -> str:
        if name in self._replaced:
            return self.adapter.where(self._replaced[name])
        return self.base.where(name) + (" with its LoRA update" if name in self._updates else "")

    def file_of(self, name: str) -> Path | None:
        return self.adapter.file_of(self._replaced[name]) if name in self._replaced else self.base.file_of(name)

    def paths(self) -> list[Path]:
        return [*self.base.paths(), *self.adapter.paths()]

    def advise(self, name: str) -> None:
        if name not in self._replaced:
            self.base.advise(name)

    def check_unchanged(self) -> None:
        self.base.check_unchanged()
        self.adapter.check_unchanged()

    def check_no_writer(self) -> None:
        self.base.check_no_writer()
        self.adapter.check_no_writer()

    def release_leases(self) -> None:
        self.base.release_leases()
        self.adapter.release_leases()

    def take_leases(self) -> None:
        self.base.take_leases()
        self.adapter.take_leases()

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def open_with_lora(model: WithLora, label: str) -> LoraSource:
    """Open ``model.model`` and the adapter folder ``model.adapter`` (adapter_config.json and its weights)."""
    from nbmerge.io.sources import PickleSource, SafetensorsSource, open_model

    folder = Path(model.adapter).expanduser()
    config_path = folder / ADAPTER_CONFIG
    if not config_path.exists() and not config_path.is_symlink():
        raise ModelInputError(f"{label}: the LoRA adapter {folder} has no {ADAPTER_CONFIG} (a PEFT adapter folder "
                              f"holds it and adapter_model.safetensors)")
    in_repository(folder, ADAPTER_CONFIG, label)
    config = load_json_object(config_path, label)
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).exists()), None)
    if weights is None:
        raise ModelInputError(f"{label}: the LoRA adapter {folder} holds neither {' nor '.join(ADAPTER_WEIGHTS)}")
    in_repository(folder, weights.name, label)
    base = open_model(model.model, label)
    try:  # the adapter's weights and its config are watched for change as the model's files are
        opener = SafetensorsSource if weights.suffix == ".safetensors" else PickleSource
        adapter = opener([weights], f"{label} (LoRA adapter)", None, (config_path,))
    except BaseException:
        base.close()
        raise
    try:
        return LoraSource(base, adapter, config, folder)
    except BaseException:
        base.close()
        adapter.close()
        raise


def _check_config(config: dict, folder: Path) -> None:
    where = f"LoRA adapter {folder / ADAPTER_CONFIG}"
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelInputError(f"{where}: peft_type {shown(config['peft_type'])} is not applied (only LORA)")
    for flag, what in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise ModelInputError(f"{where}: {flag} is set, and nbmerge does not apply {what}; merge the adapter "
                                  f"into the model with PEFT's merge_and_unload first")
    if config.get("bias", "none") != "none":
        raise ModelInputError(f"{where}: bias {shown(config['bias'])} is not applied (only bias: none)")
    _check_number(config.get("lora_alpha", 8), "lora_alpha", where)
    rank = config.get("r")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ModelInputError(f"{where}: r must be a positive integer, got {shown(rank)}")
    for field, check in (("alpha_pattern", _check_number), ("rank_pattern", _check_rank)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise ModelInputError(f"{where}: {field} must map module patterns to values, got {shown(patterns)}")
        for key, value in patterns.items():
            try:
                compile_pattern(key)
            except UnsupportedPattern as exc:
                raise ModelInputError(f"{where}: {field} pattern {shown(key)}: {exc}") from None
            check(value, f"{field}[{shown(key)}]", where)


def _check_number(value: Any, field: str, where: str) -> None:
    """A scale PEFT multiplies by: a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelInputError(f"{where}: {field} must be a finite number, got {shown(value)}")


def _check_rank(value: Any, field: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelInputError(f"{where}: {field} must be a positive integer, got {shown(value)}")


def _split_key(key: str, where: str) -> tuple[str, str]:
    """``base_model.model.<module>.<kind>`` → (module, kind)."""
    if not key.startswith(PREFIX):
        raise ModelInputError(f"{where}: tensor {shown(key)} does not start with {shown(PREFIX)} (not a PEFT adapter file)")
    inner = key[len(PREFIX):].replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    for kind in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "base_layer.weight"):
        if inner.endswith("." + kind):
            return inner[:-len(kind) - 1], kind
    if re.search(r"\.lora_[A-Za-z_]+", inner) or ".lora_magnitude_vector" in inner:
        raise ModelInputError(f"{where}: tensor {shown(key)} is a LoRA part nbmerge does not apply")
    module, _, leaf = inner.rpartition(".")
    return module, leaf
