"""Every output folder has a model card that can be published as it is, keeping the user's recipe verbatim; an
in-memory merge is saved to the same folder ``out=`` would have written (``MergeResult.save``)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import nbmerge
from nbmerge.errors import OutputExistsError
from nbmerge.model_card import hub_id
from nbmerge.recipes import parse_recipe, run_recipe
from nbmerge.workbench.models.synthetic_llama import LlamaShape, build_llama_set

SHAPE = LlamaShape(layers=2, hidden=32, intermediate=64, vocab=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return build_llama_set(tmp_path_factory.mktemp("llamas"), SHAPE)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_written_merge_has_a_card_with_front_matter_method_formula_and_models(llamas, tmp_path):
    out = tmp_path / "ties"
    nbmerge.merge("ties", llamas.models, base=llamas.base, out=out, density=0.4, progress=False)
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["tags"][:2] == ["merge", "nbmerge"]
    assert meta["library_name"] == "transformers"  # the folder has a LlamaForCausalLM config
    assert "base_model" not in meta  # local folders are not Hub ids
    method = nbmerge.methods()["ties"]
    assert method.formula in card and method.summary in card
    assert f"- base: `{llamas.base}`" in card
    assert all(f"- `{model}`" in card for model in llamas.models)
    assert '"density": 0.4' in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    recorded = json.loads((out / "nbmerge_recipe.json").read_text())
    assert json.dumps(recorded, indent=2) in card  # no recipe given: nbmerge's record is shown


def test_a_mergekit_recipe_is_kept_verbatim_in_the_card_and_as_mergekit_config(llamas, tmp_path):
    text = (f"# pasted from a model card ``` with backticks\nmerge_method: task_arithmetic\n"
            f"base_model: {llamas.base}\nmodels:\n  - model: {llamas.models[0]}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {llamas.models[1]}\n    parameters: {{weight: 0.3}}\ndtype: float32\n")
    out = tmp_path / "ta"
    run_recipe(parse_recipe(text), out=out, progress=False)
    assert (out / "mergekit_config.yml").read_text() == text
    card = (out / "README.md").read_text()
    assert "````yaml\n" + text + "````" in card  # a fence longer than the recipe's own backticks
    assert "mergekit" in front_matter(card)["tags"]


def test_an_nbmerge_recipe_is_kept_as_nbmerge_recipe_yml(llamas, tmp_path):
    text = (f"method: weighted_average\nmodels:\n  a: {llamas.models[0]}\n  b: {llamas.models[1]}\n"
            f"params: {{weights: [2, 1]}}\n")
    out = tmp_path / "avg"
    run_recipe(parse_recipe(text), out=out, progress=False)
    assert (out / "nbmerge_recipe.yml").read_text() == text
    assert text.rstrip("\n") in (out / "README.md").read_text()


def test_hub_ids_are_named_in_base_model_and_local_paths_are_not(tmp_path):
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abcd"
    assert hub_id(snapshot) == "org/name"
    local = tmp_path / "org"
    (local / "model").mkdir(parents=True)
    assert hub_id(local / "model") is None and hub_id("./org/model") is None and hub_id("../a/b") is None
    assert hub_id({"a": torch.zeros(1)}) is None


def test_an_in_memory_merge_saves_to_the_folder_out_would_have_written(llamas, tmp_path):
    in_memory = nbmerge.merge("task_arithmetic", llamas.models, base=llamas.base, scaling=0.4, progress=False)
    written = nbmerge.merge("task_arithmetic", llamas.models, base=llamas.base, scaling=0.4, progress=False,
                            out=tmp_path / "direct")
    saved = in_memory.save(tmp_path / "saved", evaluation="task  accuracy\nmath  51.0")
    assert saved == tmp_path / "saved" and in_memory.path == saved
    tensors = load_file(saved / "model.safetensors")
    assert tensors.keys() == in_memory.state_dict.keys()
    assert all(torch.equal(tensors[name], in_memory.state_dict[name]) for name in tensors)
    direct = load_file(written.path / "model.safetensors")
    assert all(torch.equal(tensors[name], direct[name]) for name in tensors)
    assert json.loads((saved / "config.json").read_text()) == json.loads((written.path / "config.json").read_text())
    card = (saved / "README.md").read_text()
    assert "## Evaluation" in card and "math  51.0" in card
    with pytest.raises(OutputExistsError):
        in_memory.save(tmp_path / "saved")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left


def test_a_written_merge_saved_again_is_copied_and_its_own_card_refreshed(llamas, tmp_path):
    result = nbmerge.merge("simple_average", llamas.models, progress=False, out=tmp_path / "avg")
    copy = result.save(tmp_path / "copy")
    assert load_file(copy / "model.safetensors").keys() == load_file(result.path / "model.safetensors").keys()
    assert result.path == tmp_path / "avg"
    result.save(result.path, evaluation="average 77.0")
    assert "average 77.0" in (result.path / "README.md").read_text()
    assert "average 77.0" not in (copy / "README.md").read_text()


def test_a_decoder_config_saved_without_architectures_still_gets_a_causal_lm_card():
    from nbmerge.model_card import model_card

    card = model_card({"models": ["a"], "base": None}, [], {"model_type": "llama"}, "m")
    assert front_matter(card)["library_name"] == "transformers" and "AutoModelForCausalLM.from_pretrained" in card
    assert "AutoModel.from_pretrained" in model_card({"models": ["a"], "base": None}, [], {"model_type": "bert"}, "m")

