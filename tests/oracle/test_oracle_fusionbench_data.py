"""Oracle tests of the data-driven merges: nbmerge's RegMean, RegMean++ and Fisher merging against FusionBench
0.2.33's own code, on tiny BERT (RegMean, Fisher) and CLIP vision (RegMean++) models in float32, fed the same
batches of the same inputs.

FusionBench reads its batches from a transformers Trainer (``regmean_merging``, ``fisher_merging``) or from a
CLIP dataset and processor (RegMean++'s CLIP class); ``Batches`` hands it the batches nbmerge draws
(``_data_pass.chosen_inputs``) through the three members those functions read. Everything else (the hooks, the
Gram matrices, the gradients, the stopping rule, the merge) is FusionBench's.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging, merging_with_fisher_weights
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights, regmean_merging
from helpers import HeadPool, model_set

import nbmerge
from nbmerge_plugins.from_data._data_pass import chosen_inputs, fisher_diagonals, input_grams

logging.getLogger("fusion_bench").setLevel(logging.WARNING)
torch.set_num_threads(1)
ATOL = 1e-5
SPLIT = "test"


@pytest.fixture(scope="module")
def bert():
    base, fine_tuned = model_set("bert")
    return base, fine_tuned, HeadPool(base)


class Batches:
    """What FusionBench's ``regmean_merging``/``fisher_merging`` read of a transformers Trainer: its batches (as
    ``model(**batch)`` takes them), its batch size, and ``_prepare_inputs`` (here: the batch as it is)."""

    def __init__(self, batches: list[dict], batch_size: int):
        self.batches, self._train_batch_size = batches, batch_size

    def get_train_dataloader(self):
        return self.batches

    def _prepare_inputs(self, inputs):
        return inputs


def drawn(pool, seed: int, count: int) -> dict[str, list]:
    """The inputs nbmerge draws for each task (seed·1000 + the model's index)."""
    return {task.name: chosen_inputs(task.inputs(SPLIT), count, seed * 1000 + index, "test", task.name)
            for index, task in enumerate(pool.tasks)}


def token_batches(inputs: list, batch_size: int) -> list[dict]:
    return [{"input_ids": torch.tensor(inputs[i:i + batch_size])} for i in range(0, len(inputs), batch_size)]


def compare(ours: dict, theirs: dict, prefix: str = "") -> float:
    return max((ours[prefix + name].double() - value.double()).abs().max().item() for name, value in theirs.items())


# -- RegMean -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio, count", [(0.1, 12), (0.95, 20)])
def test_regmean_is_fusionbench_regmean_merging(bert, ratio, count):
    """FusionBench's whole ``regmean_merging`` (Gram hooks, its stop after ``count`` examples, the closed form)
    given every input in nbmerge's drawn order: it stops where nbmerge's draw ends."""
    base, fine_tuned, pool = bert
    ours = nbmerge.merge("regmean", fine_tuned, base=base, pool=pool, progress=False, split=SPLIT,
                         num_regmean_examples=count, batch_size=4, reduce_non_diagonal_ratio=ratio, seed=3)
    everything = drawn(pool, 3, 10 ** 6)
    theirs = regmean_merging([copy.deepcopy(m) for m in fine_tuned.values()],
                             [Batches(token_batches(everything[name], 4), 4) for name in fine_tuned],
                             exclude_param_names_regex=[], nums_regmean_examples=[count] * 3,
                             reduce_non_diagonal_ratio=ratio)
    assert set(theirs) == {name for name, _ in base.named_parameters()}
    assert compare(ours.module.state_dict(), theirs) <= ATOL
    assert ours.recipe["build"]["examples"] == dict.fromkeys(fine_tuned, count)


def test_regmean_grams_and_merge_are_fusionbench_on_the_same_grams(bert):
    """The Gram matrices nbmerge collects, fed to FusionBench's ``merging_with_regmean_weights``, give nbmerge's
    merge; each Gram matrix is XᵀX / n of the linear's inputs captured independently."""
    base, fine_tuned, pool = bert
    inputs = drawn(pool, 0, 16)
    grams = [input_grams(model, pool.task(name).logits, inputs[name], 5) for name, model in fine_tuned.items()]
    model = fine_tuned["task0"]
    captured = []
    handle = model.encoder.layer[1].output.dense.register_forward_hook(
        lambda _m, args, _o: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        pool.task("task0").logits(model, inputs["task0"])
    handle.remove()
    rows = torch.cat(captured).double()
    expected = rows.T @ rows / rows.shape[0]
    assert torch.allclose(grams[0]["encoder.layer.1.output.dense"].double(), expected, rtol=1e-5, atol=1e-6)
    params = {name: [dict(m.named_parameters())[name].detach() for m in fine_tuned.values()]
              for name, _ in base.named_parameters()}
    theirs = merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=0.1)
    ours = nbmerge.merge("regmean", fine_tuned, base=base, pool=pool, progress=False, split=SPLIT,
                         num_regmean_examples=16, batch_size=5, seed=0)
    assert compare(ours.module.state_dict(), theirs) <= ATOL


# -- Fisher merging ------------------------------------------------------------------------------------------------
class Classifier(torch.nn.Module):
    """An encoder and its task's fixed head, returning ``.logits`` as FusionBench's fisher_merging reads them."""

    def __init__(self, encoder, task):
        super().__init__()
        self.encoder, self.task = encoder, task

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.task.logits(self.encoder, input_ids.tolist()))


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_fusionbench_estimate_is_fusionbench_fisher_merging(bert, normalize):
    base, fine_tuned, pool = bert
    ours = nbmerge.merge("fisher_merging", fine_tuned, base=base, pool=pool, progress=False, split=SPLIT,
                         num_fisher_examples=12, batch_size=4, estimate="fusionbench",
                         normalize_fisher_weight=normalize, seed=1)
    inputs = drawn(pool, 1, 10 ** 6)
    theirs = fisher_merging([Classifier(copy.deepcopy(m), pool.task(name)) for name, m in fine_tuned.items()],
                            [Batches(token_batches(inputs[name], 4), 4) for name in fine_tuned],
                            exclude_param_names_regex=[], nums_fisher_examples=[12] * 3,
                            normalize_fisher_weight=normalize, minimal_fisher_weight=1e-6)
    assert set(theirs) == {f"encoder.{name}" for name, _ in base.named_parameters()}
    assert compare({f"encoder.{k}": v for k, v in ours.module.state_dict().items()}, theirs) <= ATOL
    plain_mean = {k: sum(m.state_dict()[k] for m in fine_tuned.values()) / 3 for k, _ in base.named_parameters()}
    assert compare(ours.module.state_dict(), plain_mean) > 1e-3  # the Fisher weighting does something


def test_fisher_merge_step_is_fusionbench_on_the_expected_fisher(bert):
    """nbmerge's exact Fisher, fed to FusionBench's ``merging_with_fisher_weights``, gives nbmerge's merge."""
    base, fine_tuned, pool = bert
    inputs = drawn(pool, 0, 6)
    fishers = [fisher_diagonals(m, pool.task(name).logits, inputs[name], 32, "expected")
               for name, m in fine_tuned.items()]
    params = {name: [dict(m.named_parameters())[name].detach() for m in fine_tuned.values()]
              for name, _ in base.named_parameters()}
    theirs = merging_with_fisher_weights(params, fishers, torch.ones(3) / 3, normalize_fisher_weight=True,
                                         minimal_fisher_weight=1e-6)
    ours = nbmerge.merge("fisher_merging", fine_tuned, base=base, pool=pool, progress=False, split=SPLIT,
                         num_fisher_examples=6, seed=0)
    assert compare(ours.module.state_dict(), theirs) <= ATOL


# -- RegMean++ -----------------------------------------------------------------------------------------------------
class ImageTask:
    def __init__(self, name: str, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.name, self.classes = name, ["a", "b", "c"]
        self.head = torch.randn(3, 16, generator=generator)
        self.images = list(torch.randn(12, 3, 8, 8, generator=generator))

    def inputs(self, split):
        return self.images

    def logits(self, model, inputs):
        return model(pixel_values=torch.stack(list(inputs))).pooler_output @ self.head.T


class ImagePool:
    name = "tiny-clip-heads"

    def __init__(self):
        self.tasks = [ImageTask(f"task{i}", 10 + i) for i in range(3)]

    def load_encoder(self, model):
        return model

    def task(self, name):
        return next(task for task in self.tasks if task.name == name)


def fusionbench_regmean_plusplus(models: dict, base, batches: dict, ratio: float):
    """FusionBench's RegMeanAlgorithmForCLIPPlusPlus on images given as batches. Replaced: only the data
    loading (CLIP dataset, processor and zero-shot heads, which no Gram matrix depends on); repaired: its config
    mapping, and the layer call's output indexing (under transformers 5 a CLIP encoder layer returns a tensor,
    not a tuple, so FusionBench's ``layer(...)[0]`` would keep the first image of each batch). The models are
    wrapped in transformers 4's layout (``.vision_model``), which FusionBench's CLIP code addresses."""
    import lightning
    from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool

    class OnBatches(RegMeanAlgorithmForCLIPPlusPlus):
        # FusionBench's class declares a plain dict here, which its own constructor cannot read (it needs the
        # bidict its base class has): the CLIP class cannot be built as shipped
        _config_mapping = RegMeanAlgorithmPlusPlus._config_mapping | {"_dataloader_kwargs": "dataloader_kwargs"}

        def on_regmean_start(self):
            pass

        def get_input_for_first_layer(self, model, train_dataset):
            vision = model.vision_model
            return [vision.pre_layrnorm(vision.embeddings(images)).detach()
                    for images in batches[train_dataset["task"]]]

        def layer_batches_forward(self, layer, batches_input):
            return [layer(batch, attention_mask=None, causal_attention_mask=None).detach()
                    for batch in batches_input]

    class Transformers4Layout(torch.nn.Module):  # CLIPVisionModel held its transformer as .vision_model
        def __init__(self, vision):
            super().__init__()
            self.vision_model = vision

    algorithm = OnBatches(dataloader_kwargs={}, num_regmean_examples=10 ** 6, exclude_param_names_regex=[],
                          reduce_non_diagonal_ratio=ratio, weight_transpose=True)
    algorithm.fabric = lightning.Fabric(accelerator="cpu", devices=1)
    wrapped = {"_pretrained_": base, **models}
    pool = BaseModelPool({n: Transformers4Layout(copy.deepcopy(m)) for n, m in wrapped.items()},
                         train_datasets={name: {"task": name} for name in models})
    merged = algorithm.run(pool).state_dict()
    return {k.removeprefix("vision_model."): v.detach() for k, v in merged.items()}


def test_regmean_plusplus_is_fusionbench_on_clip(bert):
    torch.manual_seed(0)
    base, fine_tuned = model_set("clip")
    pool = ImagePool()
    ours = nbmerge.merge("regmean_plusplus", fine_tuned, base=base, pool=pool, progress=False, split=SPLIT,
                         num_regmean_examples=8, batch_size=4, reduce_non_diagonal_ratio=0.95, seed=2)
    inputs = drawn(pool, 2, 8)
    batches = {name: [torch.stack(images[i:i + 4]) for i in range(0, 8, 4)] for name, images in inputs.items()}
    theirs = fusionbench_regmean_plusplus(fine_tuned, base, batches, 0.95)
    state = ours.module.state_dict()
    post_norm = [name for name in theirs if "post_layernorm" in name]
    assert post_norm and compare(state, {k: v for k, v in theirs.items() if k not in post_norm}) <= ATOL
    for name in post_norm:  # FusionBench keeps the base's post-norm; nbmerge averages it
        assert torch.equal(theirs[name], base.state_dict()[name])
        assert torch.allclose(state[name], sum(m.state_dict()[name] for m in fine_tuned.values()) / 3, atol=1e-6)
    plain = nbmerge.merge("regmean", fine_tuned, base=base, pool=pool, progress=False, split=SPLIT,
                          num_regmean_examples=8, batch_size=4, reduce_non_diagonal_ratio=0.95, seed=2)
    layer1 = "encoder.layers.1.mlp.fc1.weight"
    assert (state[layer1] - plain.module.state_dict()[layer1]).abs().max() > 1e-4  # merged-path activations differ
