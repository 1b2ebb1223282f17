"""Chains of merges (mergekit-multi's several YAML documents): the order they run in, what is refused, and the
merged result against the chain's formulas computed here tensor by tensor."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import load_folder

from nbmerge.errors import OutputExistsError, RecipeError
from nbmerge.recipes import parse_recipe, run_recipe


def linear(name: str | None, *models: str, weights=None) -> str:
    entries = "".join(f"  - model: {model}\n" + (f"    parameters: {{weight: {weights[i]}}}\n" if weights else "")
                      for i, model in enumerate(models))
    return f"merge_method: linear\nmodels:\n{entries}" + (f"name: {name}\n" if name else "")


def chain(*documents: str) -> str:
    return "---\n".join(documents)


def test_each_merge_runs_after_the_merges_it_uses_and_the_unnamed_one_is_final():
    call = parse_recipe(chain(linear(None, "ab", "c"), linear("ab", "a", "bb"), linear("bb", "b", "b2")))
    assert [name for name, _ in call.intermediates] == ["bb", "ab"]
    assert set(call.models) == {"ab", "c"} and call.intermediates[1][1].models.keys() == {"a", "bb"}


def test_with_every_document_named_the_final_merge_is_the_one_no_other_uses():
    call = parse_recipe(chain(linear("first", "a", "b"), linear("second", "first", "c")))
    assert [name for name, _ in call.intermediates] == ["first"] and set(call.models) == {"first", "c"}


@pytest.mark.parametrize("text, message", [
    (chain(linear("x", "a", "y"), linear("y", "b", "x"), linear(None, "x", "c")),
     "the merges 'x' → 'y' → 'x' use each other's output (a cycle)"),
    (chain(linear("x", "a", "b"), linear("x", "c", "d")), "two documents are named 'x'"),
    (chain(linear(None, "a", "b"), linear(None, "c", "d")), "documents 1 and 2 both have no 'name'"),
    (chain(linear("x", "a", "b"), linear("y", "c", "d")), "2 of the chain's merges feed no other ('x', 'y')"),
    (chain(linear("x", "a", "b"), linear(None, "c", "d")), "merge 'x' feeds no later merge and is not the final"),
    (chain(linear("../up", "a", "b"), linear(None, "../up", "c")), "name '../up' must be a plain folder name"),
    (chain(linear("x", "a", "b"), "- a list\n"), "YAML document 2 of 2 is not a mapping"),
    (chain(linear("x", "a", "b"), "merge_method: ties\nmodels: [x]\nbase_model: b\nparameters: {lamda: 1}\n"),
     "unknown key 'lamda'"),
])
def test_what_a_chain_cannot_be_is_named(text, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def recipe_of_two_steps(llama_set) -> str:
    """avg = (θ_1 + θ_2) / 2 (linear); final = θ_0 + 0.7 (0.5 (avg − θ_0) + 1.0 (θ_3 − θ_0)) (task_arithmetic)."""
    first, second, third = map(str, llama_set.model_dirs)
    final = (f"merge_method: task_arithmetic\nbase_model: {llama_set.base_dir}\nparameters: {{lambda: 0.7}}\n"
             f"models:\n  - model: avg\n    parameters: {{weight: 0.5}}\n"
             f"  - model: {third}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    return chain(linear("avg", first, second, weights=[1, 1]), final)


def expected_chain(llama_set) -> dict[str, torch.Tensor]:
    base, (one, two, three) = llama_set.base, llama_set.models
    result = {}
    for name, theta0 in base.items():
        theta0 = theta0.double()
        average = (one[name].double() + two[name].double()) / 2
        result[name] = theta0 + 0.7 * (0.5 * (average - theta0) + (three[name].double() - theta0))
    return result


def test_a_chain_merges_what_its_formulas_say_and_leaves_no_intermediate_behind(llama_set, tmp_path):
    out = tmp_path / "final"
    result = run_recipe(parse_recipe(recipe_of_two_steps(llama_set)), out=out, progress=False)
    assert result.path == out
    merged, expected = load_folder(out), expected_chain(llama_set)
    assert set(merged) == set(expected)
    worst = max(float((merged[k].double() - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["final"]  # the temporary intermediates folder is gone
    in_memory = run_recipe(parse_recipe(recipe_of_two_steps(llama_set)), progress=False).state_dict
    assert all(torch.equal(in_memory[k], merged[k]) for k in merged)


def test_intermediates_kept_where_asked_and_an_existing_output_refused_before_any_merge_runs(llama_set, tmp_path):
    kept = tmp_path / "steps"
    run_recipe(parse_recipe(recipe_of_two_steps(llama_set)), out=tmp_path / "final", intermediate_dir=kept,
               progress=False)
    average = load_folder(kept / "avg")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(average[name], (llama_set.models[0][name] + llama_set.models[1][name]) / 2, atol=1e-6)
    fresh = tmp_path / "fresh-steps"
    with pytest.raises(OutputExistsError, match="final already exists"):
        run_recipe(parse_recipe(recipe_of_two_steps(llama_set)), out=tmp_path / "final", intermediate_dir=fresh,
                   progress=False)
    assert not (fresh / "avg").exists()


def test_a_chain_left_by_a_killed_run_is_cleared_by_the_next(llama_set, tmp_path):
    stray = tmp_path / ".final.intermediates-abc123"  # what a SIGKILL mid-chain leaves (unlocked)
    (stray / "avg").mkdir(parents=True)
    run_recipe(parse_recipe(recipe_of_two_steps(llama_set)), out=tmp_path / "final", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_the_cli_runs_a_chain_to_a_loadable_model_and_keeps_intermediates_where_asked(llama_set, tmp_path):
    from transformers import AutoModelForCausalLM

    from nbmerge.cli import main

    (tmp_path / "chain.yml").write_text(recipe_of_two_steps(llama_set))
    assert main(["merge", "--recipe", str(tmp_path / "chain.yml"), "--out", str(tmp_path / "final"),
                 "--intermediate-dir", str(tmp_path / "steps"), "--quiet"]) == 0
    merged, expected = load_folder(tmp_path / "final"), expected_chain(llama_set)
    assert max(float((merged[k].double() - expected[k]).abs().max()) for k in expected) < 1e-5
    assert (tmp_path / "steps" / "avg" / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()
