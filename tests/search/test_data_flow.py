"""Data-flow search on the MiniLM tiny pool: the slot layout and genome map, candidates equal to the layer stack their
recipe builds (checked tensor by tensor against the source models), the recipe's model loading in transformers at
its new depth, and parameter space then data-flow space starting from the first search's merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nbmerge
from nbmerge.errors import ParameterError
from nbmerge.merge_search.data_flow import DataFlowSpace, flow_slices
from nbmerge.merge_search.evaluator import CandidateEvaluator, EvaluatorSpec, read_state


def test_slots_repeat_every_models_layers_and_genes_choose_and_scale_them():
    space = DataFlowSpace(("a", "b"), layers=3, repeats=2, scales=(0.0, 2.0), max_layers=4)
    assert space.slots == 12 and space.dimension == 24
    assert [space.slot(t) for t in (0, 2, 3, 5, 6, 11)] == [("a", 0), ("a", 2), ("b", 0), ("b", 2), ("a", 0),
                                                           ("b", 2)]
    genome = np.zeros(24)
    genome[[1, 3, 4, 7, 9, 10]] = 1.0  # a1 b0 b1 a1 b0 b1: the cap keeps the first four
    genome[12 + 1], genome[12 + 3], genome[12 + 4], genome[12 + 7] = 0.5, 0.25, 0.25, 0.0
    flow = space.candidate(genome)["data_flow"]
    assert flow == [["a", 1, 1.0], ["b", 0, 0.5], ["b", 1, 0.5], ["a", 1, 0.0]]
    assert flow_slices(flow) == [{"model": "a", "layers": [1, 2], "scale": 1.0},
                                 {"model": "b", "layers": [0, 2], "scale": 0.5},
                                 {"model": "a", "layers": [1, 2], "scale": 0.0}]
    started = DataFlowSpace(("a", "b"), layers=3, repeats=2, start="b")
    assert started.candidate(started.initial_mean())["data_flow"] == [["b", 0, 1.0], ["b", 1, 1.0], ["b", 2, 1.0]]
    with pytest.raises(ParameterError, match="start 'c' is not one of the models"):
        DataFlowSpace(("a", "b"), layers=3, start="c")
    with pytest.raises(ParameterError, match="scales must be"):
        DataFlowSpace(("a",), layers=3, scales=(1.0, 0.5))


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return CandidateEvaluator(EvaluatorSpec("minilm-tiny", "passthrough"))


def test_a_candidate_is_the_layer_stack_of_its_source_layers(evaluator, tiny_zoo):
    names = evaluator.model_names()
    flow = [[names[0], 0, 1.0], [names[1], 3, 0.5], [names[1], 4, 0.5], [names[0], 3, 1.0], [names[2], 5, 0.0]]
    state = evaluator.flow_state(flow)
    sources = {name: read_state(tiny_zoo.models[name]) for name in names[:3]}
    assert sum(1 for key in state if key.endswith("attention.self.query.weight")) == len(flow)
    for k, (model, layer, scale) in enumerate(flow):
        for part in ("attention.self.query.weight", "intermediate.dense.weight", "attention.output.LayerNorm.bias"):
            assert torch.equal(state[f"encoder.layer.{k}.{part}"], sources[model][f"encoder.layer.{layer}.{part}"])
        for part in ("attention.output.dense.weight", "output.dense.bias"):
            assert torch.allclose(state[f"encoder.layer.{k}.{part}"],
                                  scale * sources[model][f"encoder.layer.{layer}.{part}"])
    assert torch.equal(state["embeddings.word_embeddings.weight"],
                       sources[names[0]]["embeddings.word_embeddings.weight"])
    with pytest.raises(ParameterError, match="includes no layer"):
        evaluator.flow_state([])


def test_parameter_space_then_data_flow_starts_from_the_first_searchs_merge(tiny_zoo, tmp_path):
    ps = nbmerge.search("minilm-tiny", "ties", {"density": (0.2, 1.0)}, fixed={"trim_scope": "tensor"},
                        generations=1, population=4, seed=0)
    folder = ps.save_merge(tmp_path / "ps").path
    evaluator = CandidateEvaluator(EvaluatorSpec("minilm-tiny", "passthrough", extra_models={"ps": str(folder)}))
    assert evaluator.flow_model_names()[-1] == "ps"
    space = DataFlowSpace(tuple(evaluator.flow_model_names()), evaluator.layer_count(), start="ps")
    start = evaluator.flow_state(space.candidate(space.initial_mean())["data_flow"])
    merged = read_state(folder)
    assert all(torch.equal(start[key], merged[key]) for key in merged)
    assert evaluator.score(space.candidate(space.initial_mean()))[0] == pytest.approx(ps.best_fitness)
    # the search scores its start before the first generation: never worse on validation than the PS merge
    both = nbmerge.search_data_flow("minilm-tiny", extra_models={"ps": folder}, start="ps", generations=0)
    assert [g.start for g in both.generations] == [True] and both.best_fitness == pytest.approx(ps.best_fitness)


def test_a_searched_stack_reruns_from_its_recipe_at_its_depth_with_the_searched_fitness(tiny_zoo, tmp_path,
                                                                                     capsys):
    """Through the CLI: the recipe it writes rebuilds a model folder of the stack's depth that transformers loads
    and that scores the search's best validation accuracy (read from the checkpoint)."""
    import yaml
    from transformers import AutoModel

    from nbmerge.cli import main
    from nbmerge.recipes import parse_recipe, run_recipe
    from nbmerge.workbench.evaluation import evaluate

    for argv, message in ((["ties", "--data-flow"], "drop METHOD and --range"),
                          (["--data-flow", "--scales", "1"], "--scales '1': expected LOW:HIGH or none")):
        with pytest.raises(SystemExit) as exit_info:
            main(["search", "minilm-tiny", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    recipe, checkpoint = tmp_path / "stack.yml", tmp_path / "search.json"
    assert main(["search", "minilm-tiny", "--data-flow", "--start", next(iter(tiny_zoo.models)), "--repeats", "1",
                 "--max-layers", "5", "--generations", "1", "--population", "4", "--seed", "1",
                 "--checkpoint", str(checkpoint), "--recipe-out", str(recipe)]) == 0
    slices = yaml.safe_load(recipe.read_text())["slices"]
    depth = sum(end - start for piece in slices for start, end in [piece["layers"]])
    assert 1 <= depth <= 5
    out = run_recipe(parse_recipe(recipe.read_text()), out=tmp_path / "stacked", progress=False).path
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == depth
    assert len(AutoModel.from_pretrained(out).encoder.layer) == depth
    best = max(f for generation in json.loads(checkpoint.read_text())["generations"] for f in generation["fitness"])
    pool = nbmerge.task_pool("minilm-tiny", progress=False)
    assert evaluate(out, pool, "validation", progress=False).average == pytest.approx(best)


def test_a_pool_of_fixed_depth_refuses_a_data_flow_search(tiny_vision_zoo):
    with pytest.raises(ParameterError, match="vision-tiny.* fixed layer structure"):
        nbmerge.search_data_flow("vision-tiny", generations=1)
