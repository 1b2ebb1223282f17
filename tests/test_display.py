"""The one-line merge summary and the method table."""

from __future__ import annotations

import torch

import nbmerge
from nbmerge.display import MethodTable, human_bytes, merge_summary
from nbmerge.plugins import all_methods, plugin_versions


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, 3.5 * 2**30)] == \
        ["0 B", "1023 B", "1.5 KiB", "5 MiB", "3.5 GiB"]


def test_merge_summary_is_one_line_with_params_models_base_and_bytes(tmp_path):
    base = {"w": torch.zeros(4, 4)}
    models = [{"w": torch.ones(4, 4)}, {"w": torch.full((4, 4), 3.0)}]
    result = nbmerge.merge("task_arithmetic", models, base=base, scaling=0.5, progress=False)
    summary = merge_summary(result, "merged")
    assert "\n" not in summary
    assert summary.startswith("merged = task_arithmetic(scaling=0.5, weights=null, normalize=false) of 2 model(s) "
                              "onto base: 1 tensors in memory; read 192 B in ")  # 3 tensors of 16 float32
    written = nbmerge.merge("weighted_average", models, out=tmp_path / "soup.safetensors", progress=False)
    assert f"-> {tmp_path / 'soup.safetensors'}" in merge_summary(written)


def test_method_table_lists_every_method_with_ranges():
    table = MethodTable(all_methods().values(), plugin_versions())
    text, page = str(table), table._repr_html_()
    for method in all_methods().values():
        assert method.name in text and method.summary in text
        for param in method.params:
            assert param.help in text and param.help.replace("'", "&#x27;").replace('"', "&quot;") in page
    assert "drop_rate=0.5 [0, 1)" in text and "rescale=true one of true, false, l1" in text
    assert "[plugin slerp 0.1.0; models 1-2; base optional]" in text
