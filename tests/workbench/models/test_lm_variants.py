"""The SmolLM2 sft → aligned variants: built from the real export, deterministic given the seed, cached, and an
interrupted build leaves nothing. A small recipe (a few short steps) keeps each build to seconds."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from nbmerge.workbench.models import causal_lm, lm_variants

SMALL = lm_variants.Recipe(seed=3, sft_steps=2, aligned_steps=2, batch_size=2, max_length=16, lr=1e-4)


@pytest.fixture(scope="module")
def export():
    return causal_lm.smollm2()


@pytest.fixture(scope="module")
def built(export, tmp_path_factory):
    return lm_variants.build_variants(SMALL, tmp_path_factory.mktemp("variants"), progress=False, base=export)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_sft_and_aligned_are_llama_folders_one_lineage(built, export):
    from transformers import AutoConfig

    base, sft, aligned = weights(export), weights(built.sft), weights(built.aligned)
    assert set(sft) == set(aligned) == set(base) and all(t.dtype == torch.bfloat16 for t in sft.values())
    config = lambda folder: {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items()  # noqa: E731
                             if k != "_name_or_path"}
    assert config(built.aligned) == config(export)
    # a full fine-tune: the layers and the (tied) embeddings moved at each stage
    # (a norm weight near 1.8 can keep its bfloat16 value: updates under half a bf16 step vanish on saving)
    for name in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(sft[name], base[name]) and not torch.equal(aligned[name], sft[name]), name
    assert built.record["train_pairs"]["sft"] > 300 and built.record["train_pairs"]["aligned"] > 300
    assert [len(v) for v in built.record["losses"].values()] == [2, 2]
    held = built.heldout["aligned"]
    assert held and all(text.startswith("<|im_start|>user\n") for text in held)
    train, heldout = lm_variants.split_pairs(lm_variants.dialogue_pairs(lm_variants.ALIGNED_TOPICS), SMALL.seed + 1)
    assert not {lm_variants.chat_text(*p) for p in train} & set(held)  # held-out texts are never trained on


def test_the_same_seed_gives_bit_identical_weights_and_the_cache_is_reused(built, export, tmp_path, monkeypatch):
    again = lm_variants.build_variants(SMALL, tmp_path, progress=False, base=export)
    for name in ("sft", "aligned"):
        first, second = weights(getattr(built, name)), weights(getattr(again, name))
        assert all(torch.equal(first[k], second[k]) for k in first), name
    assert again.record["losses"] == built.record["losses"]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached build trained again")

    monkeypatch.setattr(lm_variants, "_train", no_training)
    cached = lm_variants.build_variants(SMALL, tmp_path, progress=False, base=export)
    assert cached.root == again.root and cached.record == again.record


def test_interrupted_build_leaves_nothing_that_looks_built(export, tmp_path, monkeypatch):
    train = lm_variants._train
    stages = []

    def interrupt_the_second_stage(*args, **kwargs):
        stages.append(args[4])  # reply_only: False for sft, True for aligned
        if len(stages) == 2:  # sft is trained and saved into the staging folder by now
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(lm_variants, "_train", interrupt_the_second_stage)
    with pytest.raises(KeyboardInterrupt):
        lm_variants.build_variants(SMALL, tmp_path, progress=False, base=export)
    assert stages == [False, True]
    assert os.listdir(tmp_path) == [f".{SMALL.folder_name()}.lock"]  # no variants folder, no staging folder


def test_the_aligned_objective_takes_its_loss_on_the_reply_only(export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    pairs = [("Hello there", "Hi! How are you?"), ("What is your favourite book?", "I like to read.")]
    for reply_only in (False, True):
        batch = lm_variants._batch(tokenizer, pairs, reply_only, max_length=64)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for row, (line, reply) in enumerate(pairs):
            labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
            expected = lm_variants.chat_text(line, reply) if not reply_only else f"{reply}<|im_end|>\n"
            assert tokenizer.decode(labelled) == expected
            real = int(batch["attention_mask"][row].sum())
            assert tokenizer.decode(batch["input_ids"][row][:real].tolist()) == lm_variants.chat_text(line, reply)
