"""The MiniLM zoo: real checkpoints fine-tuned on the machine, cached, and never half-built."""

import json

import pytest
import torch
from safetensors.torch import load_file

import nbmerge
from nbmerge.errors import ParameterError
from nbmerge.workbench.models import zoo as zoo_module


def test_every_model_is_a_loadable_bert_folder_with_the_base_keys(tiny_zoo):
    from transformers import AutoModel

    base = load_file(tiny_zoo.base / "model.safetensors")
    assert set(tiny_zoo.models) == {"sentiment", "subjectivity", "debate_party", "chat_topic", "chat_language"}
    for folder in tiny_zoo.models.values():
        weights = load_file(folder / "model.safetensors")
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base.items()}
    encoder = AutoModel.from_pretrained(tiny_zoo.models["sentiment"], add_pooling_layer=False)
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384


def test_word_embeddings_frozen_and_layers_trained(tiny_zoo):
    base = load_file(tiny_zoo.base / "model.safetensors")
    for task, folder in tiny_zoo.models.items():
        weights = load_file(folder / "model.safetensors")
        assert torch.equal(weights["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
        moved = weights["encoder.layer.3.intermediate.dense.weight"] - base["encoder.layer.3.intermediate.dense.weight"]
        assert moved.abs().max() > 1e-4, f"{task}: layer 3 did not move"


def test_fine_tuning_beats_the_pretrained_encoder_and_chance(tiny_zoo):
    report = nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, progress=False)
    for task in tiny_zoo.pool.tasks:
        assert report.individual[task.name] > 100 / len(task.classes) + 5, task.name
    assert sum(report.individual.values()) / 5 > report.average + 2


def test_cached_zoo_is_reused_and_reachable_by_pool_name(tiny_zoo):
    manifest = tiny_zoo.root / "zoo.json"
    stamp = manifest.stat().st_mtime_ns
    again = zoo_module.build_zoo("tiny", seed=0, cache_dir=tiny_zoo.root.parent, progress=False)
    assert again.root == tiny_zoo.root and manifest.stat().st_mtime_ns == stamp
    pool = nbmerge.task_pool("minilm-tiny", cache_dir=tiny_zoo.root.parent, progress=False)
    assert [t.name for t in pool.tasks] == [t.name for t in tiny_zoo.pool.tasks]
    assert pool.task("chat_topic").texts("test") == tiny_zoo.pool.task("chat_topic").texts("test")
    assert json.loads(manifest.read_text())["profile"]["steps"] == zoo_module.PROFILES["tiny"].steps


def test_interrupted_build_leaves_nothing_that_looks_built(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_module, "_fine_tune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo_module.build_zoo("tiny", cache_dir=tmp_path, tasks=("chat_topic",), progress=False)
    # only the (empty) lock file may remain: no zoo folder, no staging folder
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_bad_profile_and_task_names_are_parameter_errors(tmp_path):
    with pytest.raises(ParameterError, match="profile must be one of tiny, full, got 'huge'"):
        zoo_module.build_zoo("huge", cache_dir=tmp_path)
    with pytest.raises(ParameterError, match="unknown task 'sentiments'"):
        zoo_module.build_zoo("tiny", cache_dir=tmp_path, tasks=("sentiments",))


def test_zoo_builds_load_minilm_without_printing_transformers_load_report():
    # A handler of our own on transformers' logger, not captured stderr: transformers' handler keeps the stream it
    # was created with (under xdist, possibly an earlier test's capture), and its logger does not propagate.
    import logging

    from transformers import AutoModel

    from nbmerge.workbench.models.zoo import load_report_silenced, minilm_folder

    from transformers.utils import logging as transformers_logging

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.load_reports: list[str] = []

        def emit(self, record):
            if "LOAD REPORT" in record.getMessage():
                self.load_reports.append(record.getMessage())

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()  # transformers' default, whatever an earlier test set
    recorder = Recorder()
    logging.getLogger("transformers").addHandler(recorder)
    try:
        AutoModel.from_pretrained(minilm_folder(), add_pooling_layer=False)
        assert recorder.load_reports, "what a user saw during every zoo build"
        recorder.load_reports.clear()
        with load_report_silenced():
            AutoModel.from_pretrained(minilm_folder(), add_pooling_layer=False)
        assert recorder.load_reports == []
        assert transformers_logging.get_verbosity() == transformers_logging.WARNING  # restored after the block
    finally:
        logging.getLogger("transformers").removeHandler(recorder)
        transformers_logging.set_verbosity(level)
