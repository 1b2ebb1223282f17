"""What the output folder's tokenizer gets: the chosen model's tokenizer files (a model whose vocabulary differs gets
its embedding rows permuted) and the chat template asked for (a built-in one, the models' most common, or Jinja text)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.errors import ParameterError
from nbmerge.io.chat_templates import BUILT_IN

OWN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def model_folder(path, vocabulary: list[str], template: str | None, seed: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    save_file({"model.layers.0.mlp.weight": torch.randn(4, 4, generator=generator),
               "model.embed_tokens.weight": torch.randn(len(vocabulary), 4, generator=generator)},
              path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(vocabulary)},
                                                                             unk_token=vocabulary[0])),
                                        unk_token=vocabulary[0], bos_token=vocabulary[1], eos_token=vocabulary[2])
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def folders(tmp_path):
    words = ["<unk>", "<s>", "</s>", "hello"]
    return {"a": model_folder(tmp_path / "a", words, OWN, 0), "b": model_folder(tmp_path / "b", words, OWN, 1),
            "base": model_folder(tmp_path / "base", words, BUILT_IN["chatml"], 2),
            "other": model_folder(tmp_path / "other", ["<unk>", "<s>", "</s>", "bye"], None, 3)}


def templates_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).chat_template


def test_a_built_in_or_the_most_common_chat_template_is_what_the_output_tokenizer_reads(folders, tmp_path):
    models = [folders["a"], folders["b"]]
    named = nbmerge.merge("task_arithmetic", models, base=folders["base"], out=tmp_path / "llama3", progress=False,
                          chat_template="llama3")
    assert templates_of(named.path) == BUILT_IN["llama3"]
    assert "chat_template" not in json.loads((named.path / "tokenizer_config.json").read_text())
    auto = nbmerge.merge("task_arithmetic", models, base=folders["base"], out=tmp_path / "auto", progress=False,
                         chat_template="auto")
    assert templates_of(auto.path).strip() == OWN.strip()  # two of the three models have it
    kept = nbmerge.merge("task_arithmetic", models, base=folders["base"], out=tmp_path / "kept", progress=False)
    assert templates_of(kept.path) == BUILT_IN["chatml"]  # no chat_template: the base's tokenizer files as they are


def test_a_chat_template_needs_an_output_folder_and_a_known_name(folders, tmp_path):
    models = [folders["a"], folders["b"]]
    with pytest.raises(ParameterError, match="give out=FOLDER"):
        nbmerge.merge("task_arithmetic", models, base=folders["base"], progress=False, chat_template="chatml")
    with pytest.raises(ParameterError, match=r"'vicuna' is neither a built-in template \(chatml, llama3"):
        nbmerge.merge("task_arithmetic", models, base=folders["base"], out=tmp_path / "x", progress=False,
                      chat_template="vicuna")
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_source_whose_vocabulary_differs_permutes_rows_or_says_what_is_missing(folders, tmp_path):
    with pytest.raises(ParameterError, match=r"vocabularies differ, and a has no tokenizer files or no vocab_size"):
        nbmerge.merge("simple_average", {"a": folders["a"], "other": folders["other"]}, out=tmp_path / "x",
                      progress=False, tokenizer_source="a")
    assert not (tmp_path / "x").exists()
    for name in ("a", "other"):  # with vocab_size known, other's rows follow a's tokens; 'hello' is a's alone
        config = folders[name] / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 4}))
    merged = nbmerge.merge("simple_average", {"a": folders["a"], "other": folders["other"]}, out=tmp_path / "x",
                           progress=False, tokenizer_source="a")
    embeddings = {name: load_file(folders[name] / "model.safetensors")["model.embed_tokens.weight"]
                  for name in ("a", "other")}
    result = load_file(merged.path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.allclose(result[:3], (embeddings["a"][:3] + embeddings["other"][:3]) / 2)
    assert torch.equal(result[3], embeddings["a"][3])
    merged = nbmerge.merge("simple_average", {"a": folders["a"], "b": folders["b"]}, out=tmp_path / "y",
                           progress=False, tokenizer_source="b")
    assert (merged.path / "tokenizer.json").read_text() == (folders["b"] / "tokenizer.json").read_text()
