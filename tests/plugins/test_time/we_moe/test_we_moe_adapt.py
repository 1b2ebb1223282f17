"""Test-time adaptation of WE-MoE routers, through the generic (model, batch) -> logits interface."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import model_set

from nbmerge.errors import ParameterError
from nbmerge_plugins.test_time._test_time import AdaptationTask, entropy, objective_loss, shuffled_batches
from nbmerge_plugins.test_time.we_moe.adapt import adapt
from nbmerge_plugins.test_time.we_moe.layers import routed_blocks, router_parameters, set_batch_reduce, upcycle

torch.set_num_threads(1)


def classification_tasks(seed: int = 0, classes: int = 3, tasks: int = 3, examples: int = 24):
    """Per task: a fixed linear head on the [CLS] state, and unlabeled token-id batches of 8."""
    generator = torch.Generator().manual_seed(seed)
    built = {}
    for t in range(tasks):
        head = torch.randn(classes, 16, generator=generator)
        ids = torch.randint(0, 60, (examples, 6), generator=generator)
        batches = [ids[i:i + 8] for i in range(0, examples, 8)]

        def logits(model, batch, head=head):
            return model(input_ids=batch).last_hidden_state[:, 0] @ head.T

        built[f"task{t}"] = AdaptationTask(logits, batches)
    return built


def test_entropy_is_the_mean_shannon_entropy_of_the_softmax():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [1.0, 2.0]])
    p = torch.softmax(logits, -1)
    expected = float(sum(-(row * row.log()).sum() for row in p) / 3)
    assert entropy(logits).item() == pytest.approx(expected, rel=1e-5)
    assert entropy(torch.zeros(4, 5)).item() == pytest.approx(torch.log(torch.tensor(5.0)).item(), rel=1e-6)


def test_information_max_subtracts_the_entropy_of_the_mean_prediction():
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.5, 0.5, 2.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), -1)
    mean_entropy = float(-(p * p.log()).sum(-1).mean())
    p_bar = p.mean(0)
    loss, reported = objective_loss(logits, "information_max")
    assert loss.item() == pytest.approx(mean_entropy + float((p_bar * p_bar.log()).sum()), rel=1e-5)
    assert reported.item() == pytest.approx(mean_entropy, rel=1e-5)
    # a batch predicting one class confidently: low entropy, but information_max charges it log(3) for the collapse
    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 4)
    spread = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])
    def loss(logits, objective):
        return objective_loss(logits, objective)[0].item()

    assert loss(collapsed, "entropy") == pytest.approx(loss(spread, "entropy"), rel=1e-6)
    assert loss(collapsed, "information_max") > loss(spread, "information_max") + 1.0
    with pytest.raises(ParameterError, match="objective must be one of entropy, information_max"):
        objective_loss(logits, "mutual")


def test_adaptation_lowers_entropy_and_changes_only_the_routers():
    base, fine_tuned = model_set("bert")
    moe = upcycle(base, fine_tuned)
    frozen_before = {k: v.clone() for k, v in moe.state_dict().items() if ".router." not in k}
    routers_before = {k: v.clone() for k, v in router_parameters(moe).items()}
    tasks = classification_tasks()
    with torch.no_grad():
        start = sum(entropy(t.logits(moe, b)).item() for t in tasks.values() for b in t.batches)
    history = adapt(moe, tasks, lr=1e-2, steps=30, progress=False)
    with torch.no_grad():
        end = sum(entropy(t.logits(moe, b)).item() for t in tasks.values() for b in t.batches)
    assert end < start * 0.8
    assert history.steps == 30 and not history.interrupted and len(history.task_entropy["task0"]) == 30
    assert history.loss[-1] < history.loss[0]
    for key, value in moe.state_dict().items():
        if ".router." not in key:
            assert torch.equal(value, frozen_before[key]), key
    assert all(not torch.equal(p, routers_before[k]) for k, p in router_parameters(moe).items())


def independent_information_max(logits):
    p = torch.softmax(logits, -1)
    p_bar = p.mean(0)
    return -(p * p.log()).sum(-1).mean() + (p_bar * p_bar.log()).sum()


@pytest.mark.parametrize("batch_reduce,objective", [(False, "entropy"), (True, "entropy"),
                                                    (False, "information_max")])
def test_one_step_follows_adam_on_the_gradient_of_the_summed_objective(batch_reduce, objective):
    """Adam's first step moves each parameter by −lr·g/(|g| + eps); g computed here by plain autograd, with each
    batch routed per sample or by its mean routing vector — the mode the model keeps for use."""
    per_task = entropy if objective == "entropy" else independent_information_max
    base, fine_tuned = model_set("bert")
    moe = upcycle(base, fine_tuned, batch_reduce=batch_reduce)
    reference = copy.deepcopy(moe)
    tasks = classification_tasks()
    loss = sum(per_task(task.logits(reference, task.batches[0])) for task in tasks.values())
    loss.backward()
    expected = {k: p.detach() - 1e-3 * p.grad / (p.grad.abs() + 1e-8) for k, p in router_parameters(reference).items()}
    history = adapt(moe, tasks, lr=1e-3, steps=1, objective=objective, progress=False)
    assert history.loss[0] == pytest.approx(loss.item(), rel=1e-5)
    for name, parameter in router_parameters(moe).items():
        torch.testing.assert_close(parameter.detach(), expected[name], atol=1e-6, rtol=1e-5)
    # trained as it serves: the routing mode is unchanged by adaptation
    assert {block.batch_reduce for block in routed_blocks(moe).values()} == {batch_reduce}


def test_adaptation_is_reproducible():
    base, fine_tuned = model_set("bert")
    heads = {name: torch.randn(3, 16, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("ab")}
    inputs = torch.randint(0, 60, (20, 5), generator=torch.Generator().manual_seed(9)).tolist()
    runs = []
    for _ in range(2):
        moe = upcycle(base, fine_tuned, seed=3)
        tasks = {name: AdaptationTask(lambda model, batch, h=head: model(input_ids=torch.tensor(batch))
                                      .last_hidden_state[:, 0] @ h.T, shuffled_batches(inputs, 4, seed=i))
                 for i, (name, head) in enumerate(heads.items())}
        history = adapt(moe, tasks, lr=1e-2, steps=5, progress=False)
        runs.append((history.loss, [p.detach().clone() for p in router_parameters(moe).values()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_interrupt_keeps_a_usable_model_and_the_partial_history():
    base, fine_tuned = model_set("bert")
    moe = upcycle(base, fine_tuned)
    tasks = classification_tasks()
    calls = {"n": 0}
    inner = tasks["task1"].logits

    def interrupted_logits(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:                     # during step 4
            raise KeyboardInterrupt
        return inner(model, batch)

    tasks["task1"] = AdaptationTask(interrupted_logits, tasks["task1"].batches)
    reference = upcycle(base, fine_tuned)
    with pytest.warns(UserWarning, match="interrupted after 3 of 10 steps"):
        history = adapt(moe, tasks, lr=1e-2, steps=10, progress=False)
    assert history.interrupted and history.steps == 3 and len(history.task_entropy["task2"]) == 3
    # the routers hold exactly the state after 3 complete steps
    tasks["task1"] = AdaptationTask(inner, tasks["task1"].batches)
    adapt(reference, tasks, lr=1e-2, steps=3, progress=False)
    for (name, got), want in zip(router_parameters(moe).items(), router_parameters(reference).values()):
        assert torch.equal(got, want), name
    assert all(p.grad is None for p in router_parameters(moe).values())
    assert moe(input_ids=torch.zeros(1, 4, dtype=torch.long)).last_hidden_state.isfinite().all()


def test_shuffled_batches_cover_every_input_each_epoch():
    inputs = list(range(10))
    stream = shuffled_batches(inputs, 3, seed=0)
    epoch = [next(stream) for _ in range(3)]
    assert all(len(b) == 3 for b in epoch) and len(set(sum(epoch, []))) == 9
    assert [next(shuffled_batches(inputs, 3, seed=0)) for _ in range(1)] == [epoch[0]]
    assert next(shuffled_batches(inputs[:2], 16, seed=0)) in ([0, 1], [1, 0])


def test_bad_task_data_is_a_clear_error():
    base, fine_tuned = model_set("bert")
    moe = upcycle(base, fine_tuned)
    good = classification_tasks()["task0"]
    with pytest.raises(ParameterError, match="task 'x': logits must be a \\[batch, classes\\] tensor"):
        adapt(moe, {"x": AdaptationTask(lambda m, b: good.logits(m, b)[0], good.batches)}, steps=1, progress=False)
    with pytest.raises(ParameterError, match="task 'x': the logits do not depend on the adapted parameters"):
        adapt(moe, {"x": AdaptationTask(lambda m, b: good.logits(m, b).detach(), good.batches)}, steps=1,
              progress=False)
    with pytest.raises(ParameterError, match="task 'x' has no unlabeled batches"):
        adapt(moe, {"x": AdaptationTask(good.logits, [])}, steps=1, progress=False)
    with pytest.raises(ParameterError, match="not a weight-ensembling MoE model"):
        adapt(base, {"x": good}, steps=1, progress=False)


def test_history_plots_a_loss_curve():
    history = adapt(upcycle(*model_set("bert")), classification_tasks(), lr=1e-2, steps=3, progress=False)
    figure = history.plot()
    assert len(figure.axes[0].lines) == 4                  # the sum and 3 tasks
    assert "3/3 steps" in str(history)
