"""Helpers several test folders share: reading a written model folder back, comparing state dicts, the task
arithmetic reference, small fine-tuned model sets of the families WE-MoE upcycles, and PEFT LoRA adapters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder written by nbmerge (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def task_arithmetic(base, models, scaling, weights):
    """θ_0 + λ Σ w_i (θ_i − θ_0), tensor by tensor."""
    return {k: base[k] + scaling * sum(w * (m[k] - base[k]) for m, w in zip(models, weights)) for k in base}


def assert_state_close(ours: dict, expected: dict, atol=1e-6):
    assert set(ours) == set(expected)
    worst = max((ours[k].double() - expected[k].double()).abs().max().item() for k in ours)
    assert worst <= atol, worst


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=40, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=8)
    return CLIPVisionModel(config).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=60)
    return LlamaModel(config).eval()


FAMILIES = {
    "bert": (tiny_bert, lambda: {"input_ids": torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(1)),
                                 "attention_mask": torch.ones(3, 7, dtype=torch.long)}),
    "clip": (tiny_clip_vision, lambda: {"pixel_values": torch.randn(3, 3, 8, 8,
                                                                    generator=torch.Generator().manual_seed(1))}),
    "llama": (tiny_llama, lambda: {"input_ids": torch.randint(0, 60, (3, 7),
                                                              generator=torch.Generator().manual_seed(1))}),
}


def model_set(family: str, experts: int = 3):
    """A tiny pretrained model of ``family`` and ``experts`` seeded fine-tunes of it, {task<e>: module}."""
    torch.manual_seed(0)
    base = FAMILIES[family][0]()
    return base, seeded_fine_tunes(base, experts, first_seed=100)


def seeded_fine_tunes(base: torch.nn.Module, experts: int, first_seed: int) -> dict[str, torch.nn.Module]:
    """{task<e>: base + N(0, 0.05²) noise on every parameter, seeded ``first_seed + e``}."""
    fine_tuned = {}
    for e in range(experts):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(first_seed + e)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        fine_tuned[f"task{e}"] = model
    return fine_tuned


class HeadTask:
    """A classification task over token-id inputs: a fixed linear head on a BERT encoder's [CLS] state."""

    def __init__(self, name: str, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.name, self.classes = name, ["a", "b", "c"]
        self.head = torch.randn(3, 16, generator=generator)
        self._inputs = torch.randint(0, 60, (20, 6), generator=generator).tolist()

    def inputs(self, split):
        return self._inputs

    def logits(self, model, inputs):
        return model(input_ids=torch.tensor(list(inputs))).last_hidden_state[:, 0] @ self.head.T


class HeadPool:
    """Three tasks on a tiny BERT; ``load_encoder`` takes a module, a saved folder or a state dict."""

    name = "tiny-bert-heads"

    def __init__(self, base):
        self.tasks = [HeadTask(f"task{i}", i) for i in range(3)]
        self._skeleton = base

    def load_encoder(self, model):
        if isinstance(model, torch.nn.Module):
            return model
        encoder = copy.deepcopy(self._skeleton)
        if isinstance(model, dict):
            encoder.load_state_dict(model)
            return encoder
        return type(self._skeleton).from_pretrained(model, add_pooling_layer=False).eval()

    def task(self, name):
        return next(task for task in self.tasks if task.name == name)


def make_adapter(base_dir, out, seed: int, **options):
    """A LoRA on q/v projections and the embeddings, with lm_head saved whole; B drawn at random (PEFT starts it
    at zero, which would make the update vanish). Returns PEFT's own merge of it into the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        modules_to_save=["lm_head"], **options)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(out)
    return {name: tensor.detach().clone() for name, tensor in peft_model.merge_and_unload().state_dict().items()}
