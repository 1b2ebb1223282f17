"""Side-by-side generations on the real SmolLM2-135M: greedy decoding equals transformers' own generate on the
chat-templated prompt, is deterministic, and seeded sampling repeats itself."""

import pytest
import torch

import nbmerge
from nbmerge.errors import ParameterError
from nbmerge.workbench.models import causal_lm

PROMPTS = ["Who wrote Hamlet?", "Name a fruit."]


@pytest.fixture(scope="module")
def smollm2():
    return causal_lm.smollm2()


@pytest.fixture(scope="module")
def greedy(smollm2):
    same = nbmerge.merge("expo", [smollm2], base=smollm2, progress=False, alpha=0.5)  # θ_r = θ_0: the model itself
    return nbmerge.compare_generations({"base": smollm2, "merge": same}, PROMPTS, max_new_tokens=10)


def test_greedy_replies_equal_transformers_generate(greedy, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for index, prompt in enumerate(PROMPTS):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert greedy.texts["base"][index] == expected
        assert greedy.rows[index] == {"prompt": prompt, "base": expected, "merge": expected}
    assert greedy.settings["chat"] and greedy.labels == ["base", "merge"]
    assert "Who wrote Hamlet?" in greedy._repr_html_() and "greedy" in str(greedy)


def test_greedy_is_deterministic_and_sampling_repeats_under_its_seed(greedy, smollm2):
    assert nbmerge.generate(smollm2, PROMPTS, max_new_tokens=10) == greedy.texts["base"]
    first = nbmerge.generate(smollm2, PROMPTS[:1], max_new_tokens=10, seed=3, temperature=1.0)
    assert nbmerge.generate(smollm2, PROMPTS[:1], max_new_tokens=10, seed=3, temperature=1.0) == first
    events = []
    nbmerge.compare_generations([smollm2], PROMPTS[:1], max_new_tokens=2, on_progress=events.append)
    assert [(e.phase, e.done, e.total) for e in events] == [("generate", 0, 1), ("generate", 1, 1)]


def test_a_merge_in_memory_needs_a_tokenizer_folder(smollm2):
    state = {k: v for k, v in causal_lm.load_causal_lm(smollm2, smollm2).state_dict().items()}
    with pytest.raises(ParameterError, match="pass tokenizer=FOLDER"):
        nbmerge.compare_generations({"merge": state}, PROMPTS)
    with pytest.raises(ParameterError, match="non-empty prompts"):
        nbmerge.compare_generations([smollm2], ["  "])
