"""nbmerge bench: rows, the validation-tuned choice, skipped methods, the CLI."""

import json

import pytest
import torch

import nbmerge
from nbmerge.cli import main
from nbmerge.errors import ParameterError
from nbmerge.workbench.bench import run_bench
from nbmerge.workbench.evaluation import individual_accuracy


@pytest.fixture(scope="module")
def bench(tiny_zoo):
    return run_bench("minilm-tiny", methods=["task_arithmetic", "linear"], seeds=[0],
                     cache_dir=tiny_zoo.root.parent, progress=False)


def test_rows_and_skips(bench, tiny_zoo):
    assert [row.label for row in bench.rows] == ["pretrained", "individual", "task_arithmetic",
                                                 "task_arithmetic (tuned)", "best_static"]
    assert bench.skipped == {"linear": "takes 1 to 2 model(s) besides the base, got 5"}
    pool = tiny_zoo.pool
    assert bench.row("individual").reports[0].accuracy == individual_accuracy(pool, "test", [t.name for t in pool.tasks])
    pretrained = nbmerge.evaluate(tiny_zoo.base, pool, progress=False)
    assert bench.row("pretrained").average == pytest.approx(pretrained.average)
    # the literature's first-order pattern holds even on the tiny profile
    assert bench.row("individual").average > bench.row("task_arithmetic").average > bench.row("pretrained").average


def test_tuned_row_is_the_best_grid_point_on_validation(bench, tiny_zoo):
    pool = tiny_zoo.pool
    validation = {}
    for scaling in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        merged = nbmerge.merge("task_arithmetic", pool.individual_models(), base=pool.base, progress=False,
                               scaling=scaling)
        validation[scaling] = nbmerge.evaluate(merged, pool, split="validation", progress=False).average
    best = max(validation, key=validation.get)
    tuned = bench.row("task_arithmetic (tuned)")
    assert tuned.params == [{"scaling": best}]
    merged = nbmerge.merge("task_arithmetic", pool.individual_models(), base=pool.base, progress=False, scaling=best)
    assert tuned.reports[0].accuracy == nbmerge.evaluate(merged, pool, progress=False).accuracy
    # the best static merge: the candidate (defaults, scaling 0.3, or the tuned point) best on validation, on test
    chosen = bench.row("best_static")
    assert chosen.params[0]["choice"] in ("task_arithmetic", "task_arithmetic (tuned)")
    chosen_scaling = chosen.params[0].get("scaling", 0.3)
    assert validation[chosen_scaling] == validation[best]
    merged = nbmerge.merge("task_arithmetic", pool.individual_models(), base=pool.base, progress=False,
                           scaling=chosen_scaling)
    assert chosen.reports[0].accuracy == nbmerge.evaluate(merged, pool, progress=False).accuracy


def test_json_rows_carry_per_task_means_and_spreads(bench):
    data = json.loads(bench.to_json())
    row = next(r for r in data["rows"] if r["label"] == "task_arithmetic")
    accuracy = row["reports"][0]["accuracy"]
    assert row["tasks"] == {task: {"mean": pytest.approx(value), "std": 0.0} for task, value in accuracy.items()}


def test_table_mean_and_spread_over_seeds(bench):
    row = bench.row("task_arithmetic")
    assert row.spread == 0.0 and row.average == pytest.approx(row.reports[0].average)
    text = str(bench)
    assert "task_arithmetic (tuned)" in text and "skipped linear" in text
    assert f"{row.average:.1f} ± 0.0" in text


def test_cli_bench_prints_and_writes_json(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--profile", "tiny", "--seeds", "0", "--methods", "simple_average", "--no-tune",
                 "--cache-dir", str(tiny_zoo.root.parent), "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "nbmerge bench on minilm-tiny, seeds 0" in printed and "simple_average" in printed
    data = json.loads(out.read_text())
    assert [row["label"] for row in data["rows"]] == ["pretrained", "individual", "simple_average"]
    assert data["rows"][2]["average"] == pytest.approx(sum(data["rows"][2]["reports"][0]["accuracy"].values()) / 5)


def test_cli_bench_unknown_method(tiny_zoo, capsys):
    code = main(["bench", "--methods", "tie", "--seeds", "0", "--cache-dir", str(tiny_zoo.root.parent), "--quiet"])
    assert code == 1
    assert "bench: unknown method 'tie'" in capsys.readouterr().err


def test_an_adapted_method_gets_a_row_per_objective_and_the_validation_choice(tiny_zoo):
    fixed = {"steps": 2, "select_every": 0, "granularity": "task"}
    result = run_bench("minilm-tiny", methods=["adamerging"], seeds=[0], progress=False,
                       overrides={"adamerging": fixed})
    labels = [row.label for row in result.rows]
    assert labels == ["pretrained", "individual", "adamerging (objective=entropy)",
                      "adamerging (objective=information_max)", "adamerging"]
    pool = tiny_zoo.pool
    validation = {}
    for objective in ("entropy", "information_max"):
        merged = nbmerge.merge("adamerging", tiny_zoo.models, base=tiny_zoo.base, pool=pool, progress=False,
                               objective=objective, **fixed)
        test = nbmerge.evaluate(merged, pool, progress=False)
        assert result.row(f"adamerging (objective={objective})").reports[0].accuracy == test.accuracy
        validation[objective] = nbmerge.evaluate(merged, pool, split="validation", progress=False).average
    chosen = max(validation, key=validation.get)
    assert result.row("adamerging").params == [dict(fixed, objective=chosen)]
    assert result.row("adamerging").average == result.row(f"adamerging (objective={chosen})").average


def test_data_reading_methods_read_the_chosen_split_and_their_rows_say_so(tiny_zoo):
    result = run_bench("minilm-tiny", methods=["regmean", "task_arithmetic"], seeds=[0], progress=False,
                       tune=False, cache_dir=tiny_zoo.root.parent, data_split="train")
    pool = tiny_zoo.pool
    on_train = nbmerge.merge("regmean", tiny_zoo.models, base=tiny_zoo.base, pool=pool, split="train",
                             progress=False)
    on_test = nbmerge.merge("regmean", tiny_zoo.models, base=tiny_zoo.base, pool=pool, split="test",
                            progress=False)
    assert result.row("regmean").reports[0].accuracy == nbmerge.evaluate(on_train, pool, progress=False).accuracy
    trained, tested = on_train.module.state_dict(), on_test.module.state_dict()
    assert any(not torch.equal(trained[key], tested[key]) for key in trained)  # the split changes the merge
    assert result.row("regmean").params == [{"data_split": "train"}]
    assert result.row("task_arithmetic").params == [{}]  # reads no inputs: nothing to say
    with pytest.raises(ParameterError, match="data_split must be one of train, validation, test, got 'dev'"):
        run_bench("minilm-tiny", methods=["regmean"], seeds=[0], progress=False, data_split="dev")


def test_cli_bench_set_fixes_a_parameter_and_refuses_a_bad_one(tiny_zoo, capsys):
    cache = str(tiny_zoo.root.parent)
    assert main(["bench", "--seeds", "0", "--methods", "task_arithmetic", "--no-tune", "--cache-dir", cache,
                 "--set", "task_arithmetic.scaling=0.5", "--quiet"]) == 0
    assert "scaling=0.5" in capsys.readouterr().out
    assert main(["bench", "--seeds", "0", "--methods", "task_arithmetic", "--cache-dir", cache,
                 "--set", "ties.density=0.5", "--quiet"]) == 1
    assert "parameters set for 'ties', which is not among the methods run" in capsys.readouterr().err
    assert main(["bench", "--seeds", "0", "--methods", "task_arithmetic", "--cache-dir", cache,
                 "--set", "task_arithmetic.scalin=0.5", "--quiet"]) == 1
    assert "scaling" in capsys.readouterr().err


def test_a_run_added_to_an_earlier_table_keeps_both(bench, tiny_zoo, tmp_path, capsys):
    earlier = tmp_path / "bench.json"
    bench.to_json(earlier)
    cache = str(tiny_zoo.root.parent)
    assert main(["bench", "--seeds", "0", "--methods", "simple_average", "--no-tune", "--cache-dir", cache,
                 "--add-to", str(earlier), "--quiet"]) == 0
    from nbmerge.workbench.bench import BenchResult

    combined = BenchResult.from_json(earlier)
    assert [row.label for row in combined.rows] == [row.label for row in bench.rows] + ["simple_average"]
    assert combined.row("task_arithmetic").average == bench.row("task_arithmetic").average
    assert combined.skipped == bench.skipped
    assert main(["bench", "--seeds", "1", "--methods", "simple_average", "--no-tune", "--cache-dir", cache,
                 "--add-to", str(earlier), "--quiet"]) == 1
    assert "cannot add a run on minilm-tiny seeds [1] to one on minilm-tiny seeds [0]" in capsys.readouterr().err


def test_tables_of_single_seeds_combine_into_one_of_means_over_seeds(ta8_bench):
    import copy

    from nbmerge.workbench.bench import combine_seeds

    bench = ta8_bench
    other = copy.deepcopy(bench)
    other.seeds = [7]
    for row in other.rows:
        for report in row.reports:
            report.accuracy = {task: value - 1.0 for task, value in report.accuracy.items()}
    combined = combine_seeds([bench, other])
    assert combined.seeds == [0, 7]
    for row in combined.rows:
        mine = bench.row(row.label)
        assert row.average == pytest.approx(mine.average - 0.5)
        assert row.spread == pytest.approx(0.5)
        assert len(row.params) == 2
    with pytest.raises(ParameterError, match="share a seed"):
        combine_seeds([bench, bench])


@pytest.fixture(scope="module")
def ta8_bench(tiny_ta8_zoo):
    return run_bench("ta8-text-tiny", methods=["task_arithmetic"], seeds=[0], tune=False, progress=False,
                     cache_dir=tiny_ta8_zoo.root.parent, labels={"task_arithmetic": "ta_default"})


def test_a_zero_shot_pool_names_its_base_row_and_rows_count_the_predicted_classes(ta8_bench, tiny_ta8_zoo):
    """On ta8-text-tiny: the base row is ``zero_shot``, a method's row takes the name asked for, and each report
    holds per task how many test inputs were assigned to each class (recomputed here input by input)."""
    table = ta8_bench
    assert [row.label for row in table.rows] == ["zero_shot", "individual", "ta_default"]
    report = table.row("ta_default").reports[0]
    pool = tiny_ta8_zoo.pool
    merged = nbmerge.merge("task_arithmetic", pool.individual_models(), base=pool.base, progress=False)
    encoder = pool.load_encoder(merged)
    for task in pool.tasks:
        with torch.no_grad():
            predictions = torch.stack([task.logits(encoder, [text])[0] for text in task.inputs("test")]).argmax(-1)
        assert report.predicted[task.name] == [int((predictions == c).sum()) for c in range(len(task.classes))]
        correct = (predictions == task.labels("test")).double().mean().item()
        assert report.accuracy[task.name] == pytest.approx(100 * correct)
    with pytest.raises(ParameterError, match="not among the methods run"):
        run_bench("ta8-text-tiny", methods=["task_arithmetic"], seeds=[0], labels={"ties": "x"}, progress=False)
