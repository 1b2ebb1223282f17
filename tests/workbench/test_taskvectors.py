"""Task-vector statistics, checked against whole-model computations done at once."""

import pytest
import torch

from nbmerge.method.tensor_names import layer_index
from nbmerge.workbench.taskvectors import cosine_matrix, layer_statistics


def _flat_task_vectors(model_set, keep=lambda name: True):
    names = [n for n, t in model_set.base.items() if t.is_floating_point() and keep(n)]
    return [torch.cat([(m[n].double() - model_set.base[n].double()).reshape(-1) for n in names])
            for m in model_set.models]


def test_cosine_matrix_equals_whole_model_cosines(llama_set):
    labels, matrix = cosine_matrix({"a": llama_set.model_dirs[0], "b": llama_set.models[1],
                                    "c": llama_set.model_dirs[2]}, llama_set.base_dir)
    flat = _flat_task_vectors(llama_set)
    expected = torch.tensor([[torch.nn.functional.cosine_similarity(x, y, dim=0).item() for y in flat] for x in flat],
                            dtype=torch.float64)
    assert labels == ["a", "b", "c"]
    torch.testing.assert_close(matrix, expected)


def test_layer_statistics_equal_per_layer_computations(llama_set):
    # make some entries exactly zero in one model so "shared" differs from "everywhere"
    models = [dict(m) for m in llama_set.models]
    name = "model.layers.1.mlp.up_proj.weight"
    models[0][name] = llama_set.base[name].clone()
    stats = layer_statistics(models, llama_set.base)
    assert stats.layers == [0, 1, 2, None]
    for position, layer in enumerate(stats.layers):
        flats = [torch.cat([(m[n].double() - llama_set.base[n].double()).reshape(-1)
                            for n in llama_set.base if layer_index(n) == layer]) for m in models]
        stacked = torch.stack(flats)
        shared = (stacked != 0).sum(0) >= 2
        mixed = (stacked > 0).any(0) & (stacked < 0).any(0)
        assert stats.conflict_fraction[position] == pytest.approx((mixed & shared).sum().item() / shared.sum().item())
        for i, label in enumerate(["models[0]", "models[1]", "models[2]"]):
            assert stats.delta_norms[label][position] == pytest.approx(flats[i].norm().item())
