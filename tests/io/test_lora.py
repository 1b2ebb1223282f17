"""Models with a PEFT LoRA adapter applied (``WithLora``, mergekit's ``model+adapter``): against PEFT's own
``merge_and_unload`` and against mergekit 0.1.5 through a recipe; and every adapter nbmerge cannot apply exactly
refused with the field or tensor named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import load_folder, make_adapter

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge.io.lora import WithLora


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "alpha_pattern": {"layers.1.self_attn.q_proj": 2}}],
                         ids=["plain", "rslora-alpha-pattern"])
def test_the_adapted_model_is_peft_merge_and_unload(llama_set, tmp_path, options):
    expected = make_adapter(llama_set.base_dir, tmp_path / "adapter", seed=1, **options)
    ours = nbmerge.merge("passthrough", [WithLora(llama_set.base_dir, tmp_path / "adapter")],
                         progress=False).state_dict
    assert set(ours) <= set(expected)
    for name, tensor in ours.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    changed = [name for name in ours if not torch.equal(ours[name], llama_set.base[name])]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.2.self_attn.v_proj.weight"} <= set(changed)
    assert "model.layers.0.mlp.up_proj.weight" not in changed
    # an independent look at one update: W + (α/r) B A
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj."
    scale = 8 / 2 if options.get("use_rslora") else 8 / 4
    by_hand = llama_set.base["model.layers.0.self_attn.v_proj.weight"] + scale * (
        adapter[key + "lora_B.weight"] @ adapter[key + "lora_A.weight"])
    assert torch.allclose(ours["model.layers.0.self_attn.v_proj.weight"], by_hand, atol=1e-6)


def test_a_recipe_with_model_plus_adapter_is_mergekits(llama_set, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from nbmerge.recipes import parse_recipe, run_recipe

    make_adapter(llama_set.base_dir, tmp_path / "adapter", seed=2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_set.base_dir), "dtype": "float32",
              "parameters": {"lambda": 0.8},
              "models": [{"model": f"{llama_set.model_dirs[0]}+{tmp_path / 'adapter'}", "parameters": {"weight": 1}},
                         {"model": str(llama_set.model_dirs[1]), "parameters": {"weight": 0.5}}]}
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                           lora_merge_cache=str(tmp_path / "mk-cache"))
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options=options)
    theirs = load_folder(tmp_path / "mk")
    result = run_recipe(parse_recipe(json.dumps(recipe)), out=tmp_path / "ours", progress=False)
    ours = load_folder(tmp_path / "ours")
    assert set(ours) == set(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
    assert result.recipe["models"][0].endswith("+" + str(tmp_path / "adapter"))
    without = nbmerge.merge("task_arithmetic", llama_set.model_dirs[:2], base=llama_set.base_dir, scaling=0.8,
                            weights=[1, 0.5], progress=False).state_dict  # the adapter did change the merge
    assert not torch.allclose(without["model.layers.1.self_attn.q_proj.weight"],
                              ours["model.layers.1.self_attn.q_proj.weight"], atol=1e-4)


@pytest.mark.parametrize("edit, message", [
    (lambda folder: _config(folder, use_dora=True), "use_dora is set, and nbmerge does not apply DoRA"),
    (lambda folder: _config(folder, peft_type="IA3"), "peft_type 'IA3' is not applied"),
    (lambda folder: _config(folder, bias="all"), "bias 'all' is not applied"),
    (lambda folder: (folder / "adapter_config.json").unlink(), "has no adapter_config.json"),
    (lambda folder: _tensors(folder, rename=("model.layers.0.", "model.layers.9.")),
     "adapts 'model.layers.9.self_attn.q_proj.weight', which"),
    (lambda folder: _tensors(folder, drop="lora_B"), "but not both lora_A.weight and lora_B.weight"),
    (lambda folder: _tensors(folder, rename=("lora_A.weight", "lora_C.weight")), "is a LoRA part nbmerge does not"),
])
def test_what_cannot_be_applied_exactly_is_refused_by_name(llama_set, tmp_path, edit, message):
    folder = tmp_path / "adapter"
    if not folder.exists():
        make_adapter(llama_set.base_dir, folder, seed=3)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    edit(bad)
    with pytest.raises(ModelInputError) as error:
        nbmerge.merge("passthrough", [WithLora(llama_set.base_dir, bad)], out=tmp_path / "out", progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def _config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _tensors(folder, rename=None, drop=None):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    if drop:
        tensors = {k: v for k, v in tensors.items() if not (drop in k and "layers.0.self_attn.q_proj" in k)}
    if rename:
        old, new = rename
        tensors = {(k.replace(old, new) if "layers.0.self_attn.q_proj" in k else k): v for k, v in tensors.items()}
    save_file(tensors, path)
