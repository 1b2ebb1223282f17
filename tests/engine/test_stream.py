"""The streaming engine end to end: inputs, sharded output, atomicity, strictness, progress, staleness, CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.cli import main as cli_main
from nbmerge.errors import ModelInputError, OutputExistsError, ParameterError
from nbmerge.io.sources import SafetensorsSource


def task_arithmetic_by_hand(base: dict, models: list[dict], scaling: float) -> dict:
    return {name: (base[name].double() + scaling * sum(m[name].double() - base[name].double() for m in models))
            for name in base}


def assert_close_to(expected: dict, actual: dict, atol=1e-6):
    assert set(expected) == set(actual)
    for name in expected:
        assert torch.allclose(actual[name].double(), expected[name].double(), atol=atol), name


# -- inputs and outputs --------------------------------------------------------------------------------------------
def test_sharded_folders_in_sharded_folder_out(llama_set, tmp_path):
    out = tmp_path / "merged"
    result = nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, out=out,
                           scaling=0.4, shard_size="60KB", progress=False)
    assert result.path == out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert all((out / f).stat().st_size <= 60_000 + 8 + 20_000 or len(load_file(out / f)) == 1 for f in shard_files)
    merged = load_folder(out)
    assert_close_to(task_arithmetic_by_hand(llama_set.base, llama_set.models, 0.4), merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    # the folder is a loadable Hugging Face model: config copied from the base
    assert json.loads((out / "config.json").read_text()) == json.loads((llama_set.base_dir / "config.json").read_text())
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], merged["lm_head.weight"])


def test_recipe_recorded_in_file_and_metadata(llama_set, tmp_path):
    out = tmp_path / "merged"
    nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, out=out, density=0.5,
                  trim_scope="tensor", progress=False)
    recipe = json.loads((out / "nbmerge_recipe.json").read_text())
    assert recipe["method"] == "ties" and recipe["nbmerge_version"] == nbmerge.__version__
    assert recipe["params"]["density"] == 0.5 and recipe["params"]["trim_scope"] == "tensor"
    assert recipe["models"] == [str(p) for p in llama_set.model_dirs] and recipe["base"] == str(llama_set.base_dir)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["nbmerge_recipe"]) == recipe
    # the recorded parameters reproduce the merge
    again = nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, progress=False, **recipe["params"])
    assert_close_to(again.state_dict, load_folder(out), atol=0)


def test_in_memory_modules_and_files_give_the_same_merge(llama_set):
    from transformers import LlamaForCausalLM

    modules = [LlamaForCausalLM.from_pretrained(p) for p in llama_set.model_dirs]
    from_modules = nbmerge.merge("ties", modules, base=llama_set.base, density=0.3, progress=False).state_dict
    from_files = nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, density=0.3,
                               progress=False).state_dict
    assert_close_to(from_files, from_modules, atol=0)


def test_single_file_in_single_file_out(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"a": torch.full((3,), float(i)), "b": torch.full((2, 2), 2.0 * i)}, paths[-1])
    out = tmp_path / "merged.safetensors"
    nbmerge.merge("linear", paths, out=out, t=0.25, progress=False)
    merged = load_file(out)
    assert torch.allclose(merged["a"], torch.full((3,), 0.25)) and torch.allclose(merged["b"], torch.full((2, 2), 0.5))
    assert sorted(os.listdir(tmp_path)) == ["m0.safetensors", "m1.safetensors", "merged.safetensors"]


def test_bf16_inputs_are_stored_as_bf16_or_out_dtype(bf16_llama_set, tmp_path):
    result = nbmerge.merge("simple_average", bf16_llama_set.model_dirs, progress=False)
    expected = {n: sum(m[n].float() for m in bf16_llama_set.models) / 3 for n in bf16_llama_set.base}
    for name, tensor in result.state_dict.items():
        assert tensor.dtype == torch.bfloat16
        # float32 arithmetic rounded once to bf16: within one bf16 step (2^-7 relative) of the exact mean
        # (atol covers float32 cancellation where the mean is ~0)
        assert torch.allclose(tensor.float(), expected[name], rtol=2**-7, atol=1e-8), name
    out = tmp_path / "f32"
    nbmerge.merge("simple_average", bf16_llama_set.model_dirs, out=out, out_dtype="float32", progress=False)
    assert all(t.dtype == torch.float32 for t in load_folder(out).values())
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"


def test_weights_only_pickle_checkpoints(tmp_path):
    models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    for i, model in enumerate(models):
        torch.save(model, tmp_path / f"m{i}.bin")
    merged = nbmerge.merge("simple_average", [tmp_path / "m0.bin", tmp_path / "m1.bin"], progress=False)
    assert merged.state_dict["w"].tolist() == [2.0, 4.0]


class _Exploit:
    """Unpickling it would run a shell command that creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_pickle(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(state, f)


@pytest.mark.parametrize("suffix, save", [(".bin", _legacy_pickle), (".pt", torch.save)],
                         ids=["bin-legacy-pickle", "pt-zip"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix, save):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    save({"w": _Exploit(marker)}, evil)
    torch.save({"w": torch.ones(2)}, tmp_path / "good.bin")
    with pytest.raises(ModelInputError, match=f"evil\\{suffix}.*weights-only"):
        nbmerge.merge("simple_average", [tmp_path / "good.bin", evil], progress=False)
    assert not marker.exists()


def test_inputs_are_never_modified(llama_set):
    from transformers import LlamaForCausalLM

    modules = [LlamaForCausalLM.from_pretrained(p) for p in llama_set.model_dirs]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    for method, params in [("ties", {}), ("dare", {}), ("expo", {}), ("task_arithmetic", {})]:
        result = nbmerge.merge(method, modules, base=modules[0], progress=False, **params)
        result.state_dict["lm_head.weight"].add_(1.0)  # the output never aliases an input either
    for module, saved in zip(modules, before):
        for name, value in module.state_dict().items():
            assert torch.equal(value, saved[name]), name


# -- atomic output -------------------------------------------------------------------------------------------------
def test_existing_output_is_kept_unless_overwrite(llama_set, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        nbmerge.merge("simple_average", llama_set.model_dirs, out=out, progress=False)
    assert os.listdir(out) == ["keep.txt"]
    nbmerge.merge("simple_average", llama_set.model_dirs, out=out, overwrite=True, progress=False)
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_interrupted_merge_leaves_nothing_behind(llama_set, tmp_path):
    out = tmp_path / "merged"
    seen = []

    def interrupt(event):
        seen.append(event.tensor)
        if len([t for t in seen if t]) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, out=out, on_progress=interrupt,
                      progress=False)
    assert os.listdir(tmp_path) == []


def test_a_set_cancel_event_stops_after_the_tensor_in_hand_and_writes_nothing(llama_set, tmp_path):
    import threading

    from nbmerge.errors import MergeCancelled

    out, cancel, seen = tmp_path / "merged", threading.Event(), []

    def stop_after_three(event):  # another thread (a panel's Stop button) would set it
        if event.tensor:
            seen.append(event.tensor)
        if len(seen) == 3:
            cancel.set()

    # TIES (model scope) streams a threshold pass before the merge pass: cancel reaches both
    with pytest.raises(MergeCancelled, match=r"stopped after tensor .*; nothing was written"):
        nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, out=out, on_progress=stop_after_three,
                      cancel=cancel, progress=False)
    assert len(seen) == 3 and os.listdir(tmp_path) == []
    with pytest.raises(MergeCancelled, match="before the "):  # already set: not one tensor is read
        nbmerge.merge("task_arithmetic", llama_set.models, base=llama_set.base, cancel=cancel, progress=False)
    cancel.clear()
    merged = nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, out=out, cancel=cancel,
                           progress=False)
    assert merged.path == out and out.is_dir()


def test_integer_buffers_must_agree_and_failure_leaves_no_output(tmp_path):
    a = {"w": torch.ones(4), "steps": torch.tensor([7])}
    b = {"w": torch.zeros(4), "steps": torch.tensor([7])}
    merged = nbmerge.merge("simple_average", [a, b], progress=False).state_dict
    assert merged["steps"].dtype == torch.int64 and merged["steps"].tolist() == [7]
    b["steps"] = torch.tensor([8])
    with pytest.raises(ModelInputError, match=r"'steps'.*models\[0\].*models\[1\]"):
        nbmerge.merge("simple_average", [a, b], out=tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []


# -- strictness before reading -------------------------------------------------------------------------------------
@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the inputs were checked")

    monkeypatch.setattr(SafetensorsSource, "read", refuse)


def test_parameter_mistakes_fail_before_any_tensor_is_read(llama_set, no_tensor_reads):
    with pytest.raises(ParameterError, match="did you mean 'density'"):
        nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, densty=0.3, progress=False)
    with pytest.raises(ParameterError, match=r"density.*\(0, 1\].*1\.5"):
        nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, density=1.5, progress=False)
    with pytest.raises(ParameterError, match=r"drop_rate.*\[0, 1\)"):
        nbmerge.merge("dare", llama_set.model_dirs, base=llama_set.base_dir, drop_rate=1, progress=False)
    with pytest.raises(ParameterError, match="did you mean 'slerp'"):
        nbmerge.merge("slurp", llama_set.model_dirs[:2], progress=False)
    with pytest.raises(ParameterError, match="needs a base"):
        nbmerge.merge("task_arithmetic", llama_set.model_dirs, progress=False)


def test_mismatched_models_fail_before_any_tensor_is_read(tmp_path, no_tensor_reads):
    save_file({"a": torch.ones(2, 3), "b": torch.ones(3)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(3, 2), "b": torch.ones(3)}, tmp_path / "shape.safetensors")
    save_file({"a": torch.ones(2, 3)}, tmp_path / "keys.safetensors")
    with pytest.raises(ModelInputError, match=r"tensor 'a': shape \[3, 2\] in .*shape.safetensors but \[2, 3\]"):
        nbmerge.merge("simple_average", [tmp_path / "one.safetensors", tmp_path / "shape.safetensors"],
                      progress=False)
    with pytest.raises(ModelInputError, match=r"keys.safetensors lacks 1 tensor.*'b'"):
        nbmerge.merge("simple_average", [tmp_path / "one.safetensors", tmp_path / "keys.safetensors"],
                      progress=False)
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "one.safetensors").read_bytes()[:-4])
    with pytest.raises(ModelInputError, match=r"trunc.safetensors: tensor .* truncated"):
        nbmerge.merge("simple_average", [tmp_path / "one.safetensors", tmp_path / "trunc.safetensors"],
                      progress=False)
    with pytest.raises(ModelInputError, match="no such file"):
        nbmerge.merge("simple_average", [tmp_path / "one.safetensors", tmp_path / "missing"], progress=False)


# -- long-lived processes ------------------------------------------------------------------------------------------
def test_rewritten_input_is_never_served_stale(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(1000)}, first)
    save_file({"w": torch.full((1000,), 2.0)}, second)
    assert nbmerge.merge("simple_average", [first, second], progress=False).state_dict["w"][0] == 1.0
    save_file({"w": torch.full((1000,), 4.0)}, first)  # same size, same name, new content
    assert nbmerge.merge("simple_average", [first, second], progress=False).state_dict["w"][0] == 3.0


# -- progress and report -------------------------------------------------------------------------------------------
def test_progress_events_and_report_count_every_byte(llama_set):
    events = []
    result = nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, on_progress=events.append,
                           progress=False)
    model_bytes = sum(t.numel() * t.element_size() for t in llama_set.base.values())
    # three threshold passes over 3 models + base, then the merge pass over the same
    assert result.report.bytes_read == 4 * 4 * model_bytes == events[-1].done == events[-1].total
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert {e.phase for e in events} == {"global trim threshold", "merge"}
    assert result.report.tensors == len(llama_set.base) and result.report.peak_rss_bytes > 0
    assert result.report.input_bytes == 4 * model_bytes and result.report.passes == 4
    gib = 1024**3
    assert f"read {16 * model_bytes / gib:.2f} GiB ({4 * model_bytes / gib:.2f} GiB of inputs, 4 passes)" \
        in str(result.report)
    one_pass = nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, progress=False)
    assert one_pass.report.passes == 1 and "passes" not in str(one_pass.report)


# -- command line --------------------------------------------------------------------------------------------------
def test_cli_merge_matches_the_api(llama_set, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["merge", "task_arithmetic", *map(str, llama_set.model_dirs), "--base", str(llama_set.base_dir),
                     "--out", str(out), "--scaling", "0.4", "--weights", "1,0.5,2", "--quiet"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    api = nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, scaling=0.4,
                        weights=[1, 0.5, 2], progress=False)
    assert_close_to(api.state_dict, load_folder(out), atol=0)


def test_cli_reports_user_errors_in_one_line(llama_set, capsys):
    code = cli_main(["merge", "ties", *map(str, llama_set.model_dirs), "--base", str(llama_set.base_dir),
                     "--density", "1.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("nbmerge: error: ties: parameter 'density'") and "Traceback" not in err


def test_cli_lists_methods_as_json(capsys):
    assert cli_main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {p["name"] for p in listed["ties"]["params"]} == {"density", "sign", "merge_func", "scaling",
                                                            "trim_scope", "density_over", "weights", "rescale"}
    assert listed["dare"]["params"][0] == {**listed["dare"]["params"][0], "name": "drop_rate", "high": 1.0,
                                           "high_inclusive": False}


@pytest.mark.parametrize("method", ["weighted_average", "simple_average", "linear", "task_arithmetic", "expo", "ties",
                                    "dare", "slerp", "magmax", "tall_mask", "wudi", "doge_ta"])
def test_every_method_merges_folders_via_cli_and_modules_via_api_alike(method, llama_set, tmp_path):
    declared = nbmerge.methods()[method]
    count = min(declared.max_models or 3, 3)
    base_args = ["--base", str(llama_set.base_dir)] if declared.base == "required" else []
    out = tmp_path / method
    assert cli_main(["merge", method, *map(str, llama_set.model_dirs[:count]), *base_args, "--out", str(out),
                     "--shard-size", "50KB", "--quiet"]) == 0
    from_cli = load_folder(out)
    base = llama_set.base if declared.base == "required" else None
    from_api = nbmerge.merge(method, llama_set.models[:count], base=base, progress=False).state_dict
    assert_close_to(from_api, from_cli, atol=0)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(llama_set.base)


def test_input_rewritten_during_the_merge_fails_without_output(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(10), "v": torch.zeros(10)}, first)
    save_file({"w": torch.ones(10), "v": torch.ones(10)}, second)

    def rewrite_first(event):
        if event.tensor == "v":
            save_file({"w": torch.full((10,), 5.0), "v": torch.full((10,), 5.0)}, first)

    with pytest.raises(ModelInputError, match=r"a.safetensors: the file changed while it was being merged"):
        nbmerge.merge("simple_average", [first, second], out=tmp_path / "out", on_progress=rewrite_first,
                      progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


# -- large tensors: pooled buffers and the chunked elementwise path ----------------------------------------------
def big_models(tmp_path, n_models=3, dtype=torch.bfloat16):
    """Files with tensors larger than the engine's chunk and the pool's threshold (and a few small ones)."""
    import nbmerge.engine.stream as engine

    generator = torch.Generator().manual_seed(7)
    shapes = {"big.weight": (engine.CHUNK // 512 + 3, 512 + 1), "mid.weight": (700, 1100), "small.bias": (33,)}
    base = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
    models = [{name: (t.float() + 0.1 * torch.randn(t.shape, generator=generator)).to(dtype) for name, t in base.items()}
              for _ in range(n_models)]
    save_file(base, tmp_path / "base.safetensors")
    for i, model in enumerate(models):
        save_file(model, tmp_path / f"m{i}.safetensors")
    return tmp_path / "base.safetensors", [tmp_path / f"m{i}.safetensors" for i in range(n_models)], base, models


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("method, params", [("task_arithmetic", {"scaling": 0.7, "weights": [0.5, 1.0, 2.0]}),
                                            ("weighted_average", {"weights": [0.2, 0.3, 0.5]}),
                                            ("linear", {"t": 0.3})])
def test_chunked_elementwise_merge_is_bit_identical_to_whole_tensor(tmp_path, monkeypatch, method, params, kernels):
    import nbmerge.engine.stream as engine
    from nbmerge_plugins import native

    if kernels == "torch":  # the torch path: the engine slices the big tensor
        monkeypatch.setattr(native, "library", lambda: None)
    base, models, _, _ = big_models(tmp_path)
    kwargs = dict(base=base if method == "task_arithmetic" else None, progress=False, **params)
    if method == "linear":
        kwargs["base"], models = base, models[:1]
    chunked = nbmerge.merge(method, models, **kwargs).state_dict
    monkeypatch.setattr(engine, "CHUNK", 1 << 40)
    whole = nbmerge.merge(method, models, **kwargs).state_dict
    assert set(chunked) == set(whole)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


def test_a_fused_elementwise_kernel_gets_whole_tensors_and_the_torch_path_gets_slices(tmp_path, monkeypatch):
    import nbmerge.engine.stream as engine
    from nbmerge.method.declaration import TensorJob
    from nbmerge_plugins import native

    base_path, model_paths, base, models = big_models(tmp_path)
    seen = []
    kernel, upcast = native.linear_combination, TensorJob.upcast
    monkeypatch.setattr(native, "linear_combination",
                        lambda job, *args, **kw: seen.append((job.name, job.base.numel())) or kernel(job, *args, **kw))
    params = dict(base=base_path, scaling=0.5, progress=False)
    fused = nbmerge.merge("task_arithmetic", model_paths, **params).state_dict
    assert sorted(seen) == sorted((name, value.numel()) for name, value in base.items())
    seen.clear()
    monkeypatch.setattr(native, "library", lambda: None)  # the torch path: seen through its upcast of each job
    monkeypatch.setattr(TensorJob, "upcast", lambda job: seen.append((job.name, job.base.numel())) or upcast(job))
    sliced = nbmerge.merge("task_arithmetic", model_paths, **params).state_dict
    big = base["big.weight"].numel()
    assert [n for name, n in seen if name == "big.weight"] == [engine.CHUNK] * (big // engine.CHUNK) + [big % engine.CHUNK]
    expected = base["big.weight"].double() + 0.5 * sum(m["big.weight"].double() - base["big.weight"].double()
                                                       for m in models)
    for merged in (fused, sliced):  # each within one bfloat16 rounding of the float64 value
        torch.testing.assert_close(merged["big.weight"].double(), expected.bfloat16().double(), rtol=2 ** -7, atol=1e-6)


def test_outputs_kept_in_memory_are_never_overwritten_by_pooled_buffers(tmp_path):
    """Every merged tensor returned in memory must hold its own value (an independent float64 computation)."""
    base_path, model_paths, base, models = big_models(tmp_path)
    for method in ("task_arithmetic", "ties", "dare"):
        params = {"scaling": 0.5} if method == "task_arithmetic" else (
            {"trim_scope": "tensor", "density": 1.0, "merge_func": "sum"} if method == "ties" else
            {"drop_rate": 0.0, "combine": "linear", "scaling": 0.5})
        merged = nbmerge.merge(method, model_paths, base=base_path, progress=False, **params).state_dict
        for name in base:
            b = base[name].double()
            expected = b + (1.0 if method == "ties" else 0.5) * sum(m[name].double() - b for m in models)
            if method == "ties":  # density 1, merge_func sum: the agreeing entries of the sum's sign
                vectors = torch.stack([m[name].double() - b for m in models])
                sign = vectors.sum(0).sign().masked_fill_(vectors.sum(0) == 0, 1.0)
                expected = b + (vectors * (vectors.sign() == sign)).sum(0)
            assert merged[name].dtype == torch.bfloat16
            assert torch.allclose(merged[name].double(), expected.to(torch.bfloat16).double(), atol=0.02, rtol=0.01), \
                (method, name)
        pointers = [t.data_ptr() for t in merged.values()]
        assert len(set(pointers)) == len(pointers)


def test_the_garbage_collector_is_paused_during_a_merge_and_restored_after():
    import gc

    from nbmerge.engine.stream import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller's own setting stays
    finally:
        gc.enable()


def test_every_input_tensor_is_asked_from_disk_before_it_is_read(llama_set, monkeypatch):
    """A cold merge keeps the disk busy: each tensor's bytes are requested (posix_fadvise) as it is queued."""
    from nbmerge.io import sources

    advised, read = [], []
    real_advise, real_read = sources.SafetensorsSource.advise, sources.SafetensorsSource.read

    def advise(self, name):
        advised.append((self.label, name))
        real_advise(self, name)

    def read_after_advice(self, name, pool=None):
        assert (self.label, name) in advised, f"{name} read before it was advised"
        read.append((self.label, name))
        return real_read(self, name, pool)

    monkeypatch.setattr(sources.SafetensorsSource, "advise", advise)
    monkeypatch.setattr(sources.SafetensorsSource, "read", read_after_advice)
    nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, progress=False)
    assert read and sorted(read) == sorted(advised)


def _advice_recorded(path: Path, monkeypatch) -> tuple[SafetensorsSource, list]:
    """A source on ``path`` whose posix_fadvise calls (offset, length, advice) are recorded (and still made)."""
    from nbmerge.io import sources

    advised, real_fadvise = [], os.posix_fadvise
    monkeypatch.setattr(sources.os, "posix_fadvise", lambda fd, offset, length, advice: (
        advised.append((offset, length, advice)), real_fadvise(fd, offset, length, advice))[1])
    return SafetensorsSource([path], "m", None), advised


def _tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """(file offset, length) of each tensor's bytes, from the header as the format defines it."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    header.pop("__metadata__", None)
    return {name: (8 + header_len + spec["data_offsets"][0], spec["data_offsets"][1] - spec["data_offsets"][0])
            for name, spec in header.items()}


def _saved_to_disk(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(300, 300), "b": torch.randn(5000)}, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # written back, so that its pages can be dropped
    return path


def test_tensors_already_in_the_page_cache_are_not_asked_from_disk(tmp_path, monkeypatch):
    """The advice costs the engine's thread ~0.1 ms a tensor even when every page is cached (in every pass of a
    multi-pass merge): a tensor whose bytes are cached, as a file just written is, gets none."""
    source, advised = _advice_recorded(_saved_to_disk(tmp_path), monkeypatch)
    for name in ("a", "b"):
        source.advise(name)
    source.close()
    assert advised == []


def test_tensors_not_in_the_page_cache_are_asked_from_disk_whole(tmp_path, monkeypatch):
    from nbmerge.io.mapping import page_cached

    path = _saved_to_disk(tmp_path)
    ranges = _tensor_ranges(path)
    with open(path, "rb") as f:
        for _ in range(20):  # pages still on a CPU's LRU batch or under write-back are kept: ask again
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if not any(page_cached(f, start + length - 1) for start, length in ranges.values()):
                break
            time.sleep(0.05)
        else:
            pytest.skip(f"{tmp_path} keeps its pages in memory (tmpfs): nothing to drop")
    source, advised = _advice_recorded(path, monkeypatch)
    for name in ("a", "b"):
        source.advise(name)
    source.close()
    assert advised == [(*ranges["a"], os.POSIX_FADV_WILLNEED), (*ranges["b"], os.POSIX_FADV_WILLNEED)]


def test_the_inputs_of_a_tensor_are_read_at_the_same_time(llama_set, monkeypatch):
    """A read that waits for the disk holds up no other input: every input's copy of a tensor is read by a thread
    of its own (here each read waits until all inputs' reads of the same tensor have started; read one after
    the other, the first would wait forever and the barrier break)."""
    import threading

    from nbmerge.io import sources

    inputs = len(llama_set.model_dirs) + 1
    barriers: dict[str, threading.Barrier] = {}
    lock = threading.Lock()
    real_read = sources.SafetensorsSource.read

    def read_with_the_others(self, name, pool=None):
        with lock:
            barrier = barriers.setdefault(name, threading.Barrier(inputs, timeout=20))
        barrier.wait()
        return real_read(self, name, pool)

    monkeypatch.setattr(sources.SafetensorsSource, "read", read_with_the_others)
    merged = nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, scaling=0.4,
                           progress=False)
    assert len(barriers) == len(llama_set.base)
    assert_close_to(task_arithmetic_by_hand(llama_set.base, llama_set.models, 0.4), merged.state_dict)


# -- an input truncated by another process during the merge ---------------------------------------------------------
TRUNCATOR = """
import errno, os, sys, time
path = sys.argv[1]
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # a non-blocking open for writing fails while a read lease is held (and breaks it)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            break
    time.sleep(0.001)
started = time.monotonic()
os.truncate(path, 100)  # waits until the merge gives the lease up
print(f"truncated after {time.monotonic() - started:.3f}", flush=True)
"""


@pytest.mark.parametrize("suffix, save", [(".safetensors", save_file), (".pt", torch.save)])
def test_an_input_truncated_by_another_process_stops_the_merge_with_an_error_not_a_sigbus(tmp_path, suffix, save):
    """The read lease makes the other process's truncate wait; the engine sees the pending break after the tensor in
    hand, stops with an error naming the file and writes nothing; the other process then goes on at once. The same
    for a memory-mapped .pt, whose truncation under the map would otherwise kill the interpreter with SIGBUS."""
    from nbmerge.io import leases

    first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    save({f"t{i}": torch.full((4096,), float(i)) for i in range(400)}, first)
    save({f"t{i}": torch.full((4096,), 1.0) for i in range(400)}, second)
    with open(first, "rb") as probe:
        if not leases.take(probe.fileno()):
            pytest.skip("this file system or process takes no read leases (Linux F_SETLEASE)")
        leases.release(probe.fileno())
    truncator = subprocess.Popen([sys.executable, "-c", TRUNCATOR, str(first)], stdout=subprocess.PIPE, text=True)
    assert truncator.stdout.readline().strip() == "ready"
    with pytest.raises(ModelInputError, match=rf"a{suffix}: this input is being truncated or written \(by another process"):
        nbmerge.merge("simple_average", [first, second], out=tmp_path / "out", progress=False)
    output, _ = truncator.communicate(timeout=60)
    assert truncator.returncode == 0 and float(output.split()[-1]) < 20  # released, not timed out (45 s)
    assert sorted(os.listdir(tmp_path)) == [f"a{suffix}", f"b{suffix}"] and first.stat().st_size == 100
