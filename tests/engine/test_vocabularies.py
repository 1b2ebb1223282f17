"""Merging models whose vocabularies differ under one tokenizer (tokenizer_source): embedding and head rows permuted
to the output's token ids and the missing rows filled, against mergekit 0.1.5 and against the rules written out
here token by token."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from helpers import load_folder

import nbmerge

BASE_WORDS = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(3, 20)]]  # 20 tokens


def save_model(folder, words: list[str], state: dict[str, torch.Tensor]) -> None:
    """A tiny Llama whose vocabulary is ``words`` (word-level tokenizer, id = position) with the given weights."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM(tiny_llama_config(layers=2, vocab=len(words)))
    model.load_state_dict(state)
    model.save_pretrained(folder)
    tokenizer = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def vocabulary_tensors(state: dict) -> list[str]:
    return [name for name in state if name in ("model.embed_tokens.weight", "lm_head.weight")]


@pytest.fixture(scope="module")
def three_vocabularies(tmp_path_factory):
    """base: BASE_WORDS; a: w5 and w6 swapped, plus 'alpha' and 'beta'; b: without w18 and w19, plus 'beta'.
    Every model's row for a shared token is the base's row of that token plus its own noise."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocabularies")
    torch.manual_seed(7)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(tiny_llama_config(layers=2, vocab=20)).state_dict()
            .items()}
    words = {"base": BASE_WORDS,
             "a": [*BASE_WORDS[:5], "w6", "w5", *BASE_WORDS[7:], "alpha", "beta"],
             "b": [*BASE_WORDS[:18], "beta"]}
    generator = torch.Generator().manual_seed(8)
    states = {"base": base}
    for name in ("a", "b"):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        for tensor_name in vocabulary_tensors(base):
            rows = [base[tensor_name][BASE_WORDS.index(word)] if word in BASE_WORDS
                    else torch.randn(base[tensor_name].shape[1], generator=generator) for word in words[name]]
            state[tensor_name] = torch.stack(rows) + 0.05 * torch.randn(len(rows), rows[0].shape[0],
                                                                        generator=generator)
        states[name] = state
    folders = {}
    for name, state in states.items():
        folders[name] = root / name
        save_model(folders[name], words[name], state)
    return folders, words, states


def run_mergekit(recipe: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              options=MergeOptions(device="cpu", write_model_card=False, quiet=True))
    return load_folder(out)


def recipe(folders, tokenizer_source) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(folders["base"]), "dtype": "float32",
            "parameters": {"lambda": 0.8}, "tokenizer_source": tokenizer_source,
            "models": [{"model": str(folders["a"]), "parameters": {"weight": 0.6}},
                       {"model": str(folders["b"]), "parameters": {"weight": 0.4}}]}


def output_vocabulary(folder) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


@pytest.mark.parametrize("source", ["union", "a", "base"])
def test_differing_vocabularies_merge_as_mergekit(three_vocabularies, tmp_path, source):
    from nbmerge.recipes import parse_recipe, run_recipe

    folders, _, _ = three_vocabularies
    written = recipe(folders, source if source in ("union", "base") else str(folders[source]))
    theirs = run_mergekit(written, tmp_path / "mk")
    run_recipe(parse_recipe(json.dumps(written)), out=tmp_path / "ours", progress=False)
    ours = load_folder(tmp_path / "ours")
    assert set(ours) == set(theirs)
    our_ids, their_ids = output_vocabulary(tmp_path / "ours"), output_vocabulary(tmp_path / "mk")
    assert set(our_ids) == set(their_ids)
    # mergekit numbers a union's added tokens in a hash map's order (it changes from run to run): compare by token
    order = torch.tensor([their_ids[token] for token, _ in sorted(our_ids.items(), key=lambda item: item[1])])
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        expected = theirs[name][order] if name in vocabulary_tensors(ours) else theirs[name]
        assert torch.allclose(ours[name], expected, atol=1e-6), name
    if source != "union":
        assert our_ids == their_ids
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    size = {"union": 22, "a": 22, "base": 20}[source]  # the union: the base's 20, then alpha and beta
    assert config["vocab_size"] == len(output_vocabulary(tmp_path / "ours")) == ours["lm_head.weight"].shape[0] == size


def test_the_union_rows_follow_the_fill_rules(three_vocabularies, tmp_path):
    """Task arithmetic θ_0 + λ Σ w_i (θ_i − θ_0) row by row over the union: a token all three have uses each
    model's own row; 'alpha' (only in a) is a's row in every model; 'beta' (in a and b, not the base) is their
    mean in the base; w18 (base and a) is the base's row in b."""
    folders, words, states = three_vocabularies
    merged = nbmerge.merge("task_arithmetic", {"a": folders["a"], "b": folders["b"]}, base=folders["base"],
                           scaling=0.8, weights=[0.6, 0.4], tokenizer_source="union", out=tmp_path / "out",
                           progress=False).path
    ours, vocabulary = load_folder(merged), output_vocabulary(merged)
    assert set(vocabulary) == set(BASE_WORDS) | {"alpha", "beta"} and vocabulary["w5"] == 5
    assert (vocabulary["alpha"], vocabulary["beta"]) == (20, 21)  # a's tokens in a's id order

    def row(model: str, word: str, tensor: str) -> torch.Tensor:
        return states[model][tensor][words[model].index(word)]

    def expected(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return rows["base"] + 0.8 * (0.6 * (rows["a"] - rows["base"]) + 0.4 * (rows["b"] - rows["base"]))

    for tensor in vocabulary_tensors(states["base"]):
        w5 = {m: row(m, "w5", tensor) for m in ("base", "a", "b")}
        alpha = {m: row("a", "alpha", tensor) for m in ("base", "a", "b")}
        beta_mean = (row("a", "beta", tensor) + row("b", "beta", tensor)) / 2
        beta = {"base": beta_mean, "a": row("a", "beta", tensor), "b": row("b", "beta", tensor)}
        w18 = {"base": row("base", "w18", tensor), "a": row("a", "w18", tensor), "b": row("base", "w18", tensor)}
        for word, rows in (("w5", w5), ("alpha", alpha), ("beta", beta), ("w18", w18)):
            assert torch.allclose(ours[tensor][vocabulary[word]], expected(rows), atol=1e-6), (tensor, word)


@pytest.mark.parametrize("source", ["union", "base"])
def test_a_padded_vocabulary_merges_as_mergekit(three_vocabularies, tmp_path, source):
    """mergekit's tokenizer: {source, pad_to_multiple_of}: rows rounded up to a multiple, padding rows each model's
    mean token row."""
    from nbmerge.recipes import parse_recipe, run_recipe

    folders, _, _ = three_vocabularies
    written = {key: value for key, value in recipe(folders, None).items() if key != "tokenizer_source"}
    written["tokenizer"] = {"source": source, "pad_to_multiple_of": 8}
    theirs = run_mergekit(written, tmp_path / "mk")
    run_recipe(parse_recipe(json.dumps(written)), out=tmp_path / "ours", progress=False)
    ours = load_folder(tmp_path / "ours")
    our_ids, their_ids = output_vocabulary(tmp_path / "ours"), output_vocabulary(tmp_path / "mk")
    tokens = {"union": 22, "base": 20}[source]
    assert len(our_ids) == len(their_ids) == tokens
    order = torch.tensor([their_ids[token] for token, _ in sorted(our_ids.items(), key=lambda item: item[1])])
    for name in vocabulary_tensors(ours):
        assert ours[name].shape == theirs[name].shape == (24, ours[name].shape[1]), name
        assert torch.allclose(ours[name][:tokens], theirs[name][order], atol=1e-6), name
        assert torch.allclose(ours[name][tokens:], theirs[name][tokens:], atol=1e-6), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 24


def test_padding_rows_are_the_mean_token_row_of_each_model(three_vocabularies, tmp_path):
    """With one vocabulary everywhere, the token rows merge as without padding; task arithmetic is linear, so each
    padding row (the merge of every model's mean token row) is the mean of the merged token rows."""
    folders, _, states = three_vocabularies
    generator = torch.Generator().manual_seed(9)
    models = []
    for name in ("x", "y"):
        save_model(tmp_path / name, BASE_WORDS, {key: value + 0.05 * torch.randn(value.shape, generator=generator)
                                                 for key, value in states["base"].items()})
        models.append(tmp_path / name)
    plain = nbmerge.merge("task_arithmetic", models, base=folders["base"], progress=False).state_dict
    names = vocabulary_tensors(plain)
    tokens = len(BASE_WORDS)
    padded = nbmerge.merge("task_arithmetic", models, base=folders["base"], tokenizer_source="base",
                           pad_to_multiple_of=tokens + 3, progress=False).state_dict
    assert names
    for name in plain:
        if name not in names:
            assert torch.equal(padded[name], plain[name]), name
            continue
        assert padded[name].shape[0] == tokens + 3, name
        assert torch.allclose(padded[name][:tokens], plain[name], atol=1e-6), name
        mean = plain[name].double().mean(0).float()
        assert torch.allclose(padded[name][tokens:], mean.expand(3, -1), atol=1e-5), name


@pytest.mark.parametrize("options, message", [
    ({"pad_to_multiple_of": 8}, "pad_to_multiple_of pads the vocabulary of the output's tokenizer: give "
                                "tokenizer_source too"),
    ({"pad_to_multiple_of": 0, "tokenizer_source": "base"}, "pad_to_multiple_of must be a positive integer, got 0"),
])
def test_bad_padding_is_refused_before_reading(llama_set, options, message):
    from nbmerge.errors import ParameterError

    with pytest.raises(ParameterError, match=message):
        nbmerge.merge("task_arithmetic", llama_set.model_dirs[:2], base=llama_set.base_dir, progress=False,
                      **options)


def test_the_same_vocabulary_everywhere_changes_nothing(llama_set):
    plain = nbmerge.merge("task_arithmetic", llama_set.model_dirs[:2], base=llama_set.base_dir,
                          progress=False).state_dict
    aligned = nbmerge.merge("task_arithmetic", llama_set.model_dirs[:2], base=llama_set.base_dir,
                            tokenizer_source="base", progress=False).state_dict
    assert all(torch.equal(plain[k], aligned[k]) for k in plain)


def test_a_layer_stack_takes_each_vocabulary_tensor_from_its_slice_as_mergekit(three_vocabularies, tmp_path):
    """Embeddings from the first slice (a's), the head from the last (b's): b's head rows for tokens b lacks are
    zeros (within its slice no model has them), as mergekit's are."""
    from nbmerge.recipes import parse_recipe, run_recipe

    folders, words, states = three_vocabularies
    # base_model names where the union starts (without one, mergekit picks a model from a set: random order)
    written = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
               "base_model": str(folders["a"]),
               "slices": [{"sources": [{"model": str(folders["a"]), "layer_range": [0, 2]}]},
                          {"sources": [{"model": str(folders["b"]), "layer_range": [1, 2]}]}]}
    theirs = run_mergekit(written, tmp_path / "mk")
    run_recipe(parse_recipe(json.dumps(written)), out=tmp_path / "ours", progress=False)
    ours, vocabulary = load_folder(tmp_path / "ours"), output_vocabulary(tmp_path / "ours")
    assert set(ours) == set(theirs) and vocabulary == output_vocabulary(tmp_path / "mk")
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.equal(ours["model.embed_tokens.weight"], states["a"]["model.embed_tokens.weight"])
    head = ours["lm_head.weight"]
    assert not head[vocabulary["alpha"]].any() and not head[vocabulary["w19"]].any()
    assert torch.equal(head[vocabulary["beta"]], states["b"]["lm_head.weight"][words["b"].index("beta")])


def test_a_padded_layer_stack_pads_within_each_slice_as_mergekit(three_vocabularies, tmp_path):
    from nbmerge.recipes import parse_recipe, run_recipe

    folders, _, _ = three_vocabularies
    written = {"merge_method": "passthrough", "dtype": "float32", "base_model": str(folders["a"]),
               "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
               "slices": [{"sources": [{"model": str(folders["a"]), "layer_range": [0, 2]}]},
                          {"sources": [{"model": str(folders["b"]), "layer_range": [1, 2]}]}]}
    theirs = run_mergekit(written, tmp_path / "mk")
    run_recipe(parse_recipe(json.dumps(written)), out=tmp_path / "ours", progress=False)
    ours = load_folder(tmp_path / "ours")
    assert output_vocabulary(tmp_path / "ours") == output_vocabulary(tmp_path / "mk")
    assert set(ours) == set(theirs) and ours["lm_head.weight"].shape[0] == 32
    assert all(torch.allclose(ours[name], theirs[name], atol=1e-6) for name in ours)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 32
