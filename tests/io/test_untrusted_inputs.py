"""Parsing untrusted files (nbmerge.io.untrusted, .pickles, .module_patterns, .model_configs): links that leave a
model's repository, FIFOs, bombs and deep nesting, header fields of the wrong type, allow-listed pickle classes,
tensors nbmerge cannot merge, configs that disagree. Each case fails with its own nbmerge error naming the file,
tensor or parameter, within seconds, and leaves every file as it was (no output, nothing beside it)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.errors import ModelInputError, ParameterError, RecipeError, shown
from nbmerge.recipes import parse_recipe

TENSORS = {"model.layers.0.mlp.weight": (8, 4), "model.layers.1.mlp.weight": (8, 4), "model.norm.weight": (4,)}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "num_hidden_layers": 2,
          "vocab_size": 16}
TOKENIZER = {"model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(16)}}, "added_tokens": []}


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in TENSORS.items()}


def make_model(folder, seed: int, config=None, tokenizer=True):
    folder.mkdir(parents=True)
    save_file(weights(seed), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    if tokenizer:
        (folder / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_fifo() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_hang():
    """A blocking read fails the test after 20 s instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError("blocked")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(tmp_path, error, message, *args, **kwargs):
    """``nbmerge.merge(*args, **kwargs)`` raises ``error`` matching ``message``; no file under tmp_path changes."""
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message) as caught:
        nbmerge.merge(*args, progress=False, **kwargs)
    assert snapshot(tmp_path) == before
    assert "\n" not in str(caught.value)
    return caught.value


# -- links: kept inside the model's repository; the Hugging Face cache layout accepted --------------------------

@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors"])
def test_a_file_linking_outside_its_model_is_refused_and_never_copied(tmp_path, name):
    a, b = make_model(tmp_path / "a", 1), make_model(tmp_path / "b", 2)
    secret = tmp_path / "private" / "secret.json"
    secret.parent.mkdir()
    shutil.copy(a / name, secret)  # valid content: only the link's target is wrong
    (a / name).unlink()
    (a / name).symlink_to(secret)
    refused(tmp_path, ModelInputError, rf"{name} links outside the model's repository",
            "simple_average", [a, b], out=tmp_path / "out")


def test_a_shard_index_naming_a_link_outside_is_refused(tmp_path):
    a, b = make_model(tmp_path / "a", 1), make_model(tmp_path / "b", 2)
    (tmp_path / "elsewhere.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    (a / "model.safetensors").unlink()
    (a / "shard.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (a / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "shard.safetensors"
                                                                               for n in TENSORS}}))
    refused(tmp_path, ModelInputError, "shard.safetensors links outside the model's repository",
            "simple_average", [a, b], out=tmp_path / "out")


def hf_cache_model(root, seed: int, sharded: bool):
    """A model as huggingface_hub stores it: snapshots/<rev>/<file> -> ../../blobs/<sha>."""
    repository = root / f"models--org--model{seed}"
    snapshot_dir = repository / "snapshots" / "0123abcd"
    (repository / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    staging = make_model(root / f"staging{seed}", seed)
    tensors = weights(seed)
    if sharded:
        names = list(TENSORS)
        save_file({n: tensors[n] for n in names[:2]}, staging / "model-00001-of-00002.safetensors")
        save_file({n: tensors[n] for n in names[2:]}, staging / "model-00002-of-00002.safetensors")
        (staging / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(names)}}))
        (staging / "model.safetensors").unlink()
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repository / "blobs" / f"{seed:02d}{i:038x}"
        shutil.move(file, blob)
        (snapshot_dir / file.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    staging.rmdir()
    return snapshot_dir


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_a_model_in_the_hugging_face_cache_layout_is_merged(tmp_path, sharded):
    a, b = hf_cache_model(tmp_path / "hub", 1, sharded), hf_cache_model(tmp_path / "hub", 2, sharded)
    result = nbmerge.merge("simple_average", [a, b], out=tmp_path / "out", progress=False)
    merged = load_file(next((result.path).glob("*.safetensors")))
    for name in TENSORS:  # the mean, computed here in float64
        expected = (weights(1)[name].double() + weights(2)[name].double()) / 2
        assert torch.allclose(merged[name].double(), expected, atol=1e-6), name
    assert json.loads((result.path / "config.json").read_text()) == CONFIG
    assert json.loads((result.path / "tokenizer.json").read_text()) == TOKENIZER


def test_a_cache_snapshot_linking_into_another_repository_is_refused(tmp_path):
    a, b = hf_cache_model(tmp_path / "hub", 1, False), hf_cache_model(tmp_path / "hub", 2, False)
    (a / "tokenizer.json").unlink()
    (a / "tokenizer.json").symlink_to(os.path.relpath(os.path.realpath(b / "tokenizer.json"), a))
    refused(tmp_path, ModelInputError, "tokenizer.json links outside the model's repository",
            "simple_average", [a, b], out=tmp_path / "out")


def test_an_adapter_config_linking_outside_is_refused(tmp_path):
    from nbmerge.io.lora import WithLora

    a = make_model(tmp_path / "a", 1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "secret.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    (adapter / "adapter_config.json").symlink_to(tmp_path / "secret.json")
    save_file({"base_model.model.model.norm.weight": torch.ones(4)}, adapter / "adapter_model.safetensors")
    refused(tmp_path, ModelInputError, "adapter_config.json links outside", "passthrough", [WithLora(a, adapter)],
            out=tmp_path / "out")


# -- only regular files are read -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["input file", "model.safetensors", "config.json", "tokenizer.json", "shard"])
def test_a_fifo_is_refused_not_read(tmp_path, no_hang, where):
    a, b = make_model(tmp_path / "a", 1), make_model(tmp_path / "b", 2)
    inputs = [a, b]
    if where == "input file":
        os.mkfifo(tmp_path / "pipe.safetensors")
        inputs = [tmp_path / "pipe.safetensors", b / "model.safetensors"]
    elif where == "shard":
        (a / "model.safetensors").rename(a / "real.safetensors")
        os.mkfifo(a / "shard.safetensors")
        (a / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "shard.safetensors"
                                                                                   for n in TENSORS}}))
    else:
        (a / where).unlink()
        os.mkfifo(a / where)
    refused(tmp_path, ModelInputError, "is a FIFO, not a regular file", "simple_average", inputs,
            out=tmp_path / "out")


def test_a_fifo_recipe_is_refused_by_the_cli(tmp_path, no_hang, capsys):
    from nbmerge.cli import main

    os.mkfifo(tmp_path / "recipe.yml")
    assert main(["merge", "--recipe", str(tmp_path / "recipe.yml"), "--out", str(tmp_path / "out")]) == 1
    assert "is a FIFO, not a regular file" in capsys.readouterr().err


def test_a_shard_removed_after_the_index_was_read_is_named(tmp_path):
    a, b = make_model(tmp_path / "a", 1), make_model(tmp_path / "b", 2)
    (a / "model.safetensors").unlink()
    (a / "gone.safetensors").symlink_to(a / "deleted.safetensors")  # dangling: the file went away
    (a / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "gone.safetensors"
                                                                               for n in TENSORS}}))
    refused(tmp_path, ModelInputError, r"gone.safetensors: no such file \(removed after it was found\?\)",
            "simple_average", [a, b], out=tmp_path / "out")


# -- safetensors headers: every field typed and bounded --------------------------------------------------------

def raw_file(path, header: dict | bytes, data: bytes = bytes(160)):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def entry(dtype="F32", shape=(8, 4), offsets=(0, 128)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


HEADER_CASES = {
    "negative offsets": ({"w": entry(offsets=(-16, 112))}, r"'w': data_offsets must hold non-negative integers"),
    "negative shape": ({"w": entry(shape=(-8, -4))}, r"'w': shape must hold non-negative integers"),
    "float shape": ({"w": entry(shape=(8.0, 4))}, r"'w': shape must hold non-negative integers"),
    "bool shape": ({"w": entry(shape=(True, 32))}, r"'w': shape must hold non-negative integers"),
    "string offsets": ({"w": entry(offsets=("0", "128"))}, r"'w': data_offsets must hold non-negative integers"),
    "float offsets": ({"w": entry(offsets=(0.0, 128.0))}, r"'w': data_offsets must hold non-negative integers"),
    "NaN size": (b'{"w": {"dtype": "F32", "shape": [NaN, 4], "data_offsets": [0, 128]}}',
                 r"'w': shape must hold non-negative integers"),
    "infinite size": (b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 128]}}',
                      r"'w': shape must hold non-negative integers"),
    "huge integer": ({"w": entry(shape=(10 ** 30, 4))}, r"'w' byte range \[0, 128\) does not match"),
    "5000-digit integer": (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 128]}}',
                           "header is not JSON.*integer of 5000 digits"),
    "deep nesting": (b'{"w": ' + b"[" * 5000 + b"]" * 5000 + b"}", "header is not JSON.*nested"),
    "offsets reversed": ({"w": entry(offsets=(128, 0))}, r"'w' byte range \[128, 0\)"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "w": entry()}, "__metadata__ must map names to strings"),
    "no tensors": ({"__metadata__": {"format": "pt"}}, "bad.safetensors holds no tensors"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_a_header_field_of_the_wrong_type_or_range_is_refused_by_name(tmp_path, case):
    header, message = HEADER_CASES[case]
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({"w": torch.randn(8, 4)}, good)
    raw_file(bad, header)
    error = refused(tmp_path, ModelInputError, message, "simple_average", [good, bad], out=tmp_path / "out")
    assert "bad.safetensors" in str(error) and len(str(error)) < 600


def test_an_index_with_an_empty_weight_map_is_refused(tmp_path):
    a, b = make_model(tmp_path / "a", 1), make_model(tmp_path / "b", 2)
    (a / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    refused(tmp_path, ModelInputError, "weight_map is empty", "simple_average", [a, b], out=tmp_path / "out")


@pytest.mark.parametrize("name, text, message", [
    ("model.safetensors.index.json", "[" * 3000 + "]" * 3000, "nested"),
    ("config.json", '{"hidden_size": ' + "[" * 3000 + "]" * 3000 + "}", "config.json: JSON nested too deeply"),
    ("config.json", '{"vocab_size": 16,', r"config.json: not valid JSON \(Expecting"),
    ("tokenizer.json", '{"model": {"vocab": {"a": 1e999}}}', "tokenizer.json: not a vocabulary"),
    ("tokenizer.json", "{\"model\": ", "tokenizer.json: not valid JSON"),
    ("config.json", "[1, 2]", "config.json does not hold a JSON object"),
])
def test_a_malformed_config_tokenizer_or_index_is_named(tmp_path, name, text, message):
    a, b = make_model(tmp_path / "a", 1), make_model(tmp_path / "b", 2)
    (a / name).write_text(text)
    if name == "tokenizer.json":  # read where vocabularies are aligned
        refused(tmp_path, ModelInputError, message, "task_arithmetic", [b], base=a, tokenizer_source="base",
                out=tmp_path / "out")
    else:
        refused(tmp_path, ModelInputError, message, "simple_average", [a, b], out=tmp_path / "out")


# -- tensors nbmerge cannot merge -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_inputs_are_refused_by_name(tmp_path, dtype):
    save_file({"w": torch.randn(4, 4).to(dtype)}, tmp_path / "a.safetensors")
    save_file({"w": torch.randn(4, 4).to(dtype)}, tmp_path / "b.safetensors")
    refused(tmp_path, ModelInputError, rf"a.safetensors.*tensor 'w' is FP8 \({str(dtype)[6:]}\).*dequantize",
            "simple_average", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out=tmp_path / "out")


UNMERGEABLE = {
    "complex": (lambda: torch.randn(4, 4, dtype=torch.complex64), r"tensor 'w' is complex"),
    "meta": (lambda: torch.empty(4, 4, device="meta"), r"tensor 'w' is a meta tensor"),
    "sparse": (lambda: torch.randn(4, 4).to_sparse(), r"tensor 'w' is a sparse_coo tensor"),
    "fp8": (lambda: torch.randn(4, 4).to(torch.float8_e4m3fn), r"tensor 'w' is FP8"),
}


# a meta tensor has no values for torch.save to write: it reaches nbmerge only in memory
@pytest.mark.parametrize("kind, form", [(kind, form) for kind in UNMERGEABLE for form in ("state dict", ".pt")
                                        if (kind, form) != ("meta", ".pt")])
def test_tensors_nbmerge_cannot_merge_are_refused_by_name(tmp_path, kind, form):
    make, message = UNMERGEABLE[kind]
    bad = {"w": make()}
    if form == ".pt":
        torch.save(bad, tmp_path / "bad.pt")
        bad = tmp_path / "bad.pt"
    refused(tmp_path, ModelInputError, message, "simple_average", [{"w": torch.randn(4, 4)}, bad],
            out=tmp_path / "out")


# -- pickles: nbmerge's allow-list, not the session's ---------------------------------------------------------

RAN = []


class Recorder:
    """A class a notebook allow-listed for its own files; constructing it runs code (records the call)."""

    def __init__(self, note="constructed"):
        RAN.append(note)

    def __reduce__(self):
        return Recorder, ("ran while unpickling",)


def test_a_class_the_session_allow_listed_does_not_run_from_a_checkpoint(tmp_path):
    torch.save({"w": torch.randn(4, 4), "extra": Recorder()}, tmp_path / "evil.pt")
    RAN.clear()
    with torch.serialization.safe_globals([Recorder]):
        torch.load(tmp_path / "evil.pt", weights_only=True)  # torch alone runs it: the threat is real
        assert RAN == ["ran while unpickling"]
        RAN.clear()
        refused(tmp_path, ModelInputError, r"evil.pt could not be loaded as a weights-only checkpoint: it imports "
                r".*Recorder.*add_safe_globals", "simple_average", [{"w": torch.randn(4, 4)}, tmp_path / "evil.pt"],
                out=tmp_path / "out")
    assert RAN == []


def test_a_pickle_checkpoint_is_merged_memory_mapped_or_read(tmp_path):
    """The zip format maps under a read lease, the legacy format is read; both give the mean."""
    first, second = weights(1), weights(2)
    torch.save(first, tmp_path / "a.pt")
    torch.save(second, tmp_path / "b.bin", _use_new_zipfile_serialization=False)
    merged = nbmerge.merge("simple_average", [tmp_path / "a.pt", tmp_path / "b.bin"], progress=False).state_dict
    for name in TENSORS:
        assert torch.allclose(merged[name].double(), (first[name].double() + second[name].double()) / 2)


# (a .pt input truncated by another process mid-merge: tests/engine/test_stream.py, with .safetensors)


# -- LoRA adapter configs --------------------------------------------------------------------------------------

def make_lora(folder, rank: int = 2, **config):
    """An adapter on model.layers.0.mlp of make_model's tensors (8 × 4): A rank × 4, B 8 × rank."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(7)
    save_file({"base_model.model.model.layers.0.mlp.lora_A.weight": torch.randn(rank, 4, generator=generator),
               "base_model.model.model.layers.0.mlp.lora_B.weight": torch.randn(8, rank, generator=generator)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 4,
                                                            **config}))
    return folder


def test_a_catastrophic_alpha_pattern_is_matched_in_bounded_time_as_peft_reads_it(tmp_path):
    from nbmerge.io.lora import WithLora

    model = make_model(tmp_path / "m", 1)
    # against 'model.layers.0.mlp', Python's re backtracks 2^n ways before failing; PEFT would never return
    adapter = make_lora(tmp_path / "adapter", alpha_pattern={"([a-z_.0-9]+)+Z": 100, r"layers\.0\.m(l|x)p": 6})
    started = time.perf_counter()
    merged = nbmerge.merge("passthrough", [WithLora(model, adapter)], progress=False).state_dict
    assert time.perf_counter() - started < 10
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.0.mlp.weight"
    expected = weights(1)[name].double() + 6 / 2 * (tensors[f"base_model.model.{name[:-7]}.lora_B.weight"].double()
                                                     @ tensors[f"base_model.model.{name[:-7]}.lora_A.weight"].double())
    assert torch.allclose(merged[name].double(), expected, atol=1e-5)  # the second pattern's α = 6, not 100


@pytest.mark.parametrize("config, message", [
    ({"alpha_pattern": {"(mlp": 4}}, r"alpha_pattern pattern '\(mlp': not a valid regular expression"),
    ({"rank_pattern": {r"(m)\1lp": 2}}, r"rank_pattern pattern .*: groupref .* is not supported"),
    ({"alpha_pattern": {"mlp": "big"}}, r"alpha_pattern\['mlp'\] must be a finite number, got 'big'"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"r": 8}, r"module 'model.layers.0.mlp' has rank 2 in its tensors, but the config declares r = 8"),
    ({"r": 0}, "r must be a positive integer, got 0"),
])
def test_an_adapter_config_that_cannot_be_applied_names_the_field(tmp_path, config, message):
    from nbmerge.io.lora import WithLora

    model = make_model(tmp_path / "m", 1)
    adapter = make_lora(tmp_path / "adapter", **config)
    refused(tmp_path, ModelInputError, message, "passthrough", [WithLora(model, adapter)], out=tmp_path / "out")


def test_a_rank_0_adapter_is_refused(tmp_path):
    from nbmerge.io.lora import WithLora

    model = make_model(tmp_path / "m", 1)
    adapter = make_lora(tmp_path / "adapter", rank=0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["r"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(tmp_path, ModelInputError, r"lora_A.weight' has rank 0", "passthrough", [WithLora(model, adapter)],
            out=tmp_path / "out")


def test_module_patterns_match_as_python_re_does():
    """The automaton against re itself, on patterns re answers quickly."""
    import re

    from nbmerge.io.module_patterns import compile_pattern

    names = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "q_proj", "lm_head", "a.b"]
    patterns = ["q_proj", r"layers\.\d+\.mlp.*", "(q|k|v)_proj", "[^.]+_proj", r"layers\.[0-3]\.self_attn\.[qk]_proj",
                "^model.layers.1.mlp.down_proj", r"\w+\.\d{1,2}\.(mlp|self_attn)\.\w+", "lm_hea?d", "(a|)+b", "b$"]
    for pattern in patterns:
        for name in names:
            assert compile_pattern(pattern).matches(name) == bool(re.match(rf"(.*\.)?({pattern})$", name)), \
                (pattern, name)


# -- configs that disagree -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, other", [("architectures", ["MistralForCausalLM"]), ("model_type", "mistral"),
                                          ("num_attention_heads", 2), ("vocab_size", 32)])
def test_models_whose_configs_disagree_are_refused_unless_forced(tmp_path, field, other):
    a = make_model(tmp_path / "a", 1, {**CONFIG, "num_attention_heads": 4})
    b = make_model(tmp_path / "b", 2, {**CONFIG, "num_attention_heads": 4, field: other})
    refused(tmp_path, ModelInputError, rf"configs disagree on {field}: .* in \S*/a \(.*/a/config.json\), "
            rf"{re_escape(shown(other))} in \S*/b .*allow_config_mismatch=True",
            "simple_average", [a, b], out=tmp_path / "out")
    merged = nbmerge.merge("simple_average", [a, b], allow_config_mismatch=True, progress=False).state_dict
    name = "model.norm.weight"
    assert torch.allclose(merged[name].double(), (weights(1)[name].double() + weights(2)[name].double()) / 2)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_the_cli_flag_forces_a_config_mismatch(tmp_path, capsys):
    from nbmerge.cli import main

    a = make_model(tmp_path / "a", 1)
    b = make_model(tmp_path / "b", 2, {**CONFIG, "model_type": "mistral"})
    assert main(["merge", "simple_average", str(a), str(b), "--out", str(tmp_path / "out"), "--quiet"]) != 0
    assert "configs disagree on model_type" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["merge", "simple_average", str(a), str(b), "--out", str(tmp_path / "out"), "--quiet",
                 "--allow-config-mismatch"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_layer_stack_of_different_depths_is_not_a_mismatch(tmp_path):
    a = make_model(tmp_path / "a", 1)
    b = make_model(tmp_path / "b", 2, {**CONFIG, "num_hidden_layers": 3})
    shutil.copy(tmp_path / "a" / "model.safetensors", tmp_path / "plain.safetensors")
    save_file({**weights(2), "model.layers.2.mlp.weight": torch.ones(8, 4)}, b / "model.safetensors")
    result = nbmerge.stack([nbmerge.LayerSlice({"a": a}, {"a": (0, 1)}), nbmerge.LayerSlice({"b": b}, {"b": (2, 3)})],
                           progress=False)
    assert torch.equal(result.state_dict["model.layers.1.mlp.weight"], torch.ones(8, 4))
    other = make_model(tmp_path / "c", 3, {**CONFIG, "model_type": "mistral"})
    with pytest.raises(ModelInputError, match="configs disagree on model_type"):
        nbmerge.stack([nbmerge.LayerSlice({"a": a}, {"a": (0, 1)}), nbmerge.LayerSlice({"c": other}, {"c": (1, 2)})],
                      progress=False)


# -- recipes: bounded, and errors in the recipe's own words ----------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("where", ["params: {density: *i}", "out_dtype: *i", "models: *i", "method: *i"])
def test_an_alias_bomb_where_an_error_prints_the_value_fails_fast(where):
    text = "method: ties\nmodels: [m1, m2]\n" + BOMB.replace("a: &a", "zz: &a") + where + "\n"
    text = text.replace("method: ties\n", "", 1) if where.startswith("method") else text
    text = text.replace("models: [m1, m2]\n", "", 1) if where.startswith("models") else text
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases expand to more than 100000 values"):
        parse_recipe(text)
    assert time.perf_counter() - started < 5


def test_bounded_reprs_of_huge_and_shared_values():
    bomb = ["x"] * 9
    for _ in range(9):
        bomb = [bomb] * 9
    started = time.perf_counter()
    assert len(shown(bomb)) <= 200 and len(shown({"k": "v" * 10 ** 6})) <= 200 and shown(0.5) == "0.5"
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("text", ["[" * 20000 + "]" * 20000, "method: ties\nmodels: " + "[" * 200 + "]" * 200])
def test_deeply_nested_recipes_are_refused(text):
    with pytest.raises(RecipeError, match="nested deeper than 32 levels"):
        parse_recipe(text)


@pytest.mark.parametrize("recipe, message", [
    ("merge_method: dare_ties\nbase_model: b\nmodels:\n  - model: x\n    parameters: {density: -0.5, weight: 1}",
     r"dare_ties: density must be in \(0, 1\] .*got -0.5 \(model 'x'\)"),
    ("merge_method: dare_linear\nbase_model: b\nparameters: {density: 1.5}\nmodels: [x, y]",
     r"dare_linear: density must be in \(0, 1\] .*got 1.5"),
    ("merge_method: ties\nbase_model: b\nparameters: {lambda: .nan}\nmodels: [x, y]", "ties: lambda must be a number"),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: x\n    parameters: {weight: [1, abc]}",
     r"task_arithmetic: weight must be a number .*\(model 'x'\)"),
])
def test_a_recipe_error_names_the_parameter_as_the_recipe_wrote_it(recipe, message):
    with pytest.raises(RecipeError, match=message) as caught:
        parse_recipe(recipe)
    assert "drop_rate" not in str(caught.value) and "scaling" not in str(caught.value)


def test_dare_density_in_range_still_becomes_the_drop_rate():
    call = parse_recipe("merge_method: dare_ties\nbase_model: b\nparameters: {density: 0.25}\nmodels: [x, y]")
    assert math.isclose(call.params["drop_rate"], 0.75)
