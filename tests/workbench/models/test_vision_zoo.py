"""The vision zoo (tiny profile): balanced seeded splits, fine-tuning that keeps the BatchNorm statistics, and a
pool that evaluates any backbone the user holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge.workbench.models.imagedata import TASK_LOADERS
from nbmerge.workbench.models.training import SPLITS


def test_eight_tasks_with_balanced_splits(tiny_vision_zoo):
    pool = tiny_vision_zoo.pool
    assert [task.name for task in pool.tasks] == list(TASK_LOADERS)
    for task in pool.tasks:
        counts = {split: np.bincount(task.labels(split).numpy(), minlength=len(task.classes)) for split in SPLITS}
        per_class = tiny_vision_zoo.profile.per_class
        assert counts["train"].tolist() == [round(per_class * 0.6)] * len(task.classes), task.name
        assert counts["validation"].tolist() == [round(per_class * 0.15)] * len(task.classes), task.name
        assert task.inputs("test").shape[1:] == (3, 48, 48) and 0.0 <= task.inputs("test").min()


def test_fine_tuning_moves_the_weights_and_keeps_the_batchnorm_statistics(tiny_vision_zoo):
    pool = tiny_vision_zoo.pool
    base = pool.load_encoder(tiny_vision_zoo.base).state_dict()
    for name, folder in tiny_vision_zoo.models.items():
        tuned = pool.load_encoder(folder).state_dict()
        assert not torch.equal(tuned["blocks.5.expand_conv.weight"], base["blocks.5.expand_conv.weight"]), name
        for key in base:
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(tuned[key], base[key]), (name, key)


def test_individual_accuracy_is_each_fine_tuned_model_on_its_own_task(tiny_vision_zoo):
    """The pool's `individual` row is each task's own model evaluated on that task, well above chance.

    (That fine-tuning beats the pretrained backbone with the task heads holds on the full profile: 78.8 against
    70.6 on seed 0, in benchmarks/results/bench-hard.json. The tiny profile's 14 training images per class are
    already fitted by the heads alone, so it is not asserted here.)"""
    pool = tiny_vision_zoo.pool
    report = nbmerge.evaluate(tiny_vision_zoo.base, pool, progress=False)
    assert set(report.individual) == {task.name for task in pool.tasks}
    for task in pool.tasks:
        own = nbmerge.evaluate(tiny_vision_zoo.models[task.name], pool, tasks=[task.name], progress=False)
        assert report.individual[task.name] == own.accuracy[task.name], task.name
        # 1.5× chance: the tiny skin_tone test split has 30 images; the build is bitwise the same run to run on one
        # machine (rebuilt and compared), but CPUs differ in float kernels: 11 of 30 (36.7%) on one, ≥ 12 on CI's
        assert own.accuracy[task.name] > 100 * 1.5 / len(task.classes), task.name


def test_a_checkpoint_of_another_architecture_is_refused(tiny_vision_zoo, llama_set):
    with pytest.raises(ModelInputError, match="model for task pool 'vision-tiny' lacks .* backbone weight"):
        tiny_vision_zoo.pool.load_encoder(llama_set.base_dir)
