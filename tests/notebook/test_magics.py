"""The magics through a real IPython InteractiveShell: merges land in notebook variables with the right numbers,
recipes match mergekit's own result, and every user mistake is a one-line UsageError."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_state_close, load_folder, make_adapter, task_arithmetic
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import nbmerge


@pytest.fixture(scope="module")
def shell():
    ipython = InteractiveShell.instance()
    ipython.displayhook.flush = lambda: None  # its gc.collect() at every cell made the suite twice as slow
    ipython.run_line_magic("load_ext", "nbmerge")
    return ipython


@pytest.fixture
def ns(shell, llama_set):
    """A notebook namespace holding the tiny Llama set as state dicts and as paths."""
    shell.user_ns.update(base=llama_set.base, ft0=llama_set.models[0], ft1=llama_set.models[1],
                         ft2=llama_set.models[2], base_dir=str(llama_set.base_dir),
                         dirs=[str(d) for d in llama_set.model_dirs])
    return shell.user_ns


def run(shell, code: str):
    """Run a cell like a notebook does; re-raise any error, a UsageError included."""
    result = shell.run_cell(code)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result


def usage_error(shell, capsys, code: str) -> str:
    capsys.readouterr()
    result = shell.run_cell(code)
    assert type(result.error_in_exec) is UsageError, result.error_in_exec
    err = capsys.readouterr().err.strip()
    assert err.startswith("UsageError: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_line_merge_of_variables_lands_in_var(shell, ns, llama_set, capsys):
    run(shell, "%merge task_arithmetic ft0 ft1 --base base --scaling 0.5 --weights 1,0.5 --quiet -o merged")
    assert_state_close(ns["merged"].state_dict,
                       task_arithmetic(llama_set.base, llama_set.models[:2], 0.5, [1.0, 0.5]))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(
        "merged = task_arithmetic(scaling=0.5, weights=[1.0, 0.5], normalize=false) of 2 model")


def test_paths_lists_modules_and_results_as_models(shell, ns, llama_set, tmp_path):
    from transformers import LlamaForCausalLM

    ns["module"] = LlamaForCausalLM.from_pretrained(llama_set.model_dirs[2])
    # a list variable expands to its models; {expr} expands in the line; a MergeResult is a model too
    ns["pair"] = ns["dirs"][:2]
    run(shell, "%merge weighted_average pair module --weights 1,2,1 --quiet -o soup")
    run(shell, "%merge linear soup {base_dir} --t 0.25 --quiet -o half")
    weights = [0.25, 0.5, 0.25]
    soup = {k: sum(w * m[k] for w, m in zip(weights, llama_set.models)) for k in llama_set.base}
    assert_state_close(ns["soup"].state_dict, soup)
    assert ns["soup"].recipe["models"] == ["pair[0]", "pair[1]", "module"]
    assert_state_close(ns["half"].state_dict, {k: 0.75 * soup[k] + 0.25 * llama_set.base[k] for k in soup})


def test_without_var_the_result_is_the_cell_value_and_out_writes_a_folder(shell, ns, llama_set, tmp_path, capsys):
    result = run(shell, f"%merge ties ft0 ft1 ft2 --base base --density 0.5 --trim-scope tensor --out {tmp_path}/m")
    assert isinstance(result.result, nbmerge.MergeResult) and result.result.path == tmp_path / "m"
    direct = nbmerge.merge("ties", llama_set.models, base=llama_set.base, density=0.5, trim_scope="tensor",
                           progress=False).state_dict
    assert_state_close(load_folder(tmp_path / "m"), direct, atol=0)
    assert "nbmerge ties" in capsys.readouterr().err  # the progress bar (text in a plain shell, a widget in Jupyter)


@pytest.mark.parametrize("code, message", [
    ("%merge tise ft0 ft1", "unknown merge method 'tise'; did you mean 'ties'?"),
    ("%merge ties ft0 ft1 --base base --densty 0.3", "unknown parameter --densty; did you mean --density?"),
    ("%merge ties ft0 ft1 --base base --density 1.5", "parameter 'density' must be in (0, 1], got 1.5"),
    ("%merge ties ft0 ft1 --base base --sign most", "parameter 'sign' must be one of sum, count, got 'most'"),
    ("%merge ties ft0 nope --base base", "model 'nope' is neither a notebook variable nor an existing file"),
    ("%merge ties ft0 ft1", "ties: needs a base (pretrained) model: pass --base B"),
    ("%merge ties ft0 ft1 --base base_dir/missing", "neither a notebook variable nor an existing file"),
    ("%merge task_arithmetic ft0 ft1 --base base --weights 1,2,3", "has 3 values for 2 models"),
    ("%merge weighted_average ft0 number", "variable 'number' holds a int"),
    ("%merge", "give a method and models"),
    ("%merge ties --base base", "the following arguments are required: models"),
    ("%merge weighted_average ft0 ft1 -o 2x", "not a valid variable name"),
])
def test_user_mistakes_are_one_line_usage_errors(shell, ns, capsys, code, message):
    ns["number"] = 3
    assert message in usage_error(shell, capsys, code)


def test_a_nan_input_is_a_usage_error_unless_allowed_in_the_line_and_in_the_cell(shell, ns, capsys):
    ns["bad"] = {k: v.clone() for k, v in ns["ft1"].items()}
    ns["bad"]["model.norm.weight"][3] = float("nan")
    message = usage_error(shell, capsys, "%merge simple_average ft0 bad --quiet")
    assert "bad: tensor 'model.norm.weight' holds NaN or Inf" in message and "--allow-nonfinite" in message
    run(shell, "%merge simple_average ft0 bad --allow-nonfinite --quiet -o kept")
    assert int(ns["kept"].state_dict["model.norm.weight"].isnan().sum()) == 1
    recipe = "method: simple_average\nmodels: [ft0, bad]"
    assert "holds NaN or Inf" in usage_error(shell, capsys, f"%%merge --quiet\n{recipe}")
    run(shell, f"%%merge --allow-nonfinite --quiet -o kept_too\n{recipe}")
    assert int(ns["kept_too"].state_dict["model.norm.weight"].isnan().sum()) == 1


def test_method_help_and_magic_help(shell, capsys):
    run(shell, "%merge ties --help")
    help_text = capsys.readouterr().out
    for flag in ("--density", "--trim-scope", "--merge-func", "-o VAR", "--base"):
        assert flag in help_text
    run(shell, "%merge?")
    magic_help = capsys.readouterr().out
    assert "%merge METHOD MODEL..." in magic_help and "%%merge" in magic_help
    for method in nbmerge.methods().values():  # generated from the registry when asked
        assert method.name in magic_help
        assert all(param.name in magic_help for param in method.params)


def test_merge_methods_table(shell, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda value: shown.append(value))
    assert run(shell, "%merge_methods -o table\nx = 1").result is None  # not the last line: displayed all the same
    table = shell.user_ns["table"]
    assert shown == [table]
    assert [row["name"] for row in table.rows] == sorted(nbmerge.methods())
    ties = next(row for row in table.rows if row["name"] == "ties")
    assert ties["base"] == "required" and ties["plugin"] == "ties"
    density = next(p for p in ties["params"] if p["name"] == "density")
    assert density["valid"] == "(0, 1]" and density["default"] == 0.2
    assert "<code>density=0.2 (0, 1]</code>" in table._repr_html_()
    run(shell, "%merge_methods slerp ties -o chosen")
    assert [row["name"] for row in shell.user_ns["chosen"].rows] == ["slerp", "ties"]


# -- %%merge recipes against mergekit itself -------------------------------------------------------------------
MERGEKIT_RECIPES = {
    "linear": """
        merge_method: linear
        models:
          - model: {ft0}
            parameters: {{weight: 0.3}}
          - model: {ft1}
            parameters: {{weight: 0.5}}
        dtype: float32
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{lambda: 0.8, normalize: true}}
        models:
          - model: {ft0}
            parameters: {{weight: 0.3}}
          - model: {ft1}
            parameters: {{weight: 0.6}}
    """,
    "ties": """
        merge_method: ties
        base_model: {base}
        parameters: {{density: 0.4, int8_mask: true}}
        models:
          - model: {base}
          - model: {ft0}
            parameters: {{weight: 0.7}}
          - model: {ft1}
            parameters: {{weight: 0.4}}
          - model: {ft2}
            parameters: {{weight: 0.5}}
    """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: {base}
        models:
          - model: {ft0}
            parameters: {{weight: 0.5, density: 1.0}}
          - model: {ft1}
            parameters: {{weight: 0.8, density: 1.0}}
    """,
    "slerp": """
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 3]
              - model: {ft1}
                layer_range: [0, 3]
        merge_method: slerp
        base_model: {base}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 1]
            - value: 0.3
        dtype: float32
    """,
}


@pytest.mark.parametrize("name", list(MERGEKIT_RECIPES))
def test_mergekit_recipe_gives_mergekits_result(shell, ns, llama_set, tmp_path, name):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    paths = dict(base=llama_set.base_dir, **{f"ft{i}": d for i, d in enumerate(llama_set.model_dirs)})
    recipe = textwrap.dedent(MERGEKIT_RECIPES[name]).format(**paths)
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe)), str(tmp_path / "mk"), options=options)
    run(shell, f"%%merge -o from_recipe --quiet\n{recipe}")
    assert_state_close(ns["from_recipe"].state_dict, load_folder(tmp_path / "mk"), atol=1e-5)


CHAIN = """
    merge_method: linear
    models:
      - model: {ft0}
        parameters: {{weight: 1.0}}
      - model: {ft1}
        parameters: {{weight: 3.0}}
    dtype: float32
    name: blend
    ---
    merge_method: ties
    base_model: {base}
    parameters: {{density: 0.5}}
    models:
      - model: blend
        parameters: {{weight: 0.6}}
      - model: {ft2}
        parameters: {{weight: 0.4}}
    dtype: float32
"""


def test_a_chain_of_merges_gives_mergekit_multis_result(shell, ns, llama_set, tmp_path):
    """Several YAML documents: mergekit-multimerge's own loader and task graph against %%merge, once with paths
    and once with notebook variables (state dicts) as the models."""
    from mergekit.graph import Executor
    from mergekit.merge import MergeOptions
    from mergekit.scripts.multimerge import load_config, make_tasks

    paths = dict(base=llama_set.base_dir, **{f"ft{i}": d for i, d in enumerate(llama_set.model_dirs)})
    recipe = textwrap.dedent(CHAIN).format(**paths)
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True)
    configs, dependencies = load_config(recipe, str(tmp_path / "mk-steps"))
    tasks = make_tasks(configs, dependencies, options, str(tmp_path / "mk-steps"), str(tmp_path / "mk"), lazy=False)
    Executor(tasks, math_device="cpu", storage_device="cpu").execute()
    theirs = load_folder(tmp_path / "mk")
    run(shell, f"%%merge -o chained --quiet\n{recipe}")
    assert_state_close(ns["chained"].state_dict, theirs, atol=1e-5)
    by_variable = textwrap.dedent(CHAIN).format(base="base", ft0="ft0", ft1="ft1", ft2="ft2")
    run(shell, f"%%merge -o chained_vars --quiet\n{by_variable}")
    assert_state_close(ns["chained_vars"].state_dict, theirs, atol=1e-5)


def test_a_recipe_model_with_a_lora_adapter_takes_variables_for_both(shell, ns, llama_set, tmp_path, capsys):
    """mergekit's model+adapter, both parts notebook variables; the adapter applied is PEFT's merge_and_unload."""
    adapted = make_adapter(llama_set.base_dir, tmp_path / "adapter", seed=5)
    ns["style_lora"] = str(tmp_path / "adapter")
    run(shell, "%%merge -o with_lora --quiet\nmerge_method: passthrough\nmodels: [base_dir+style_lora]\n")
    merged = ns["with_lora"].state_dict
    assert all(torch.allclose(merged[k], adapted[k], atol=1e-6) for k in merged)
    assert "model 'no_such_lora' is neither" in usage_error(
        shell, capsys, "%%merge\nmerge_method: passthrough\nmodels: [base_dir+no_such_lora]\n")


def test_nbmerge_recipe_with_variables(shell, ns, llama_set):
    run(shell, textwrap.dedent("""\
        %%merge -o recipe_result --quiet
        method: task_arithmetic
        models: {math: ft0, code: ft1}
        base: base
        params: {scaling: 0.4, weights: [1, 2]}
    """))
    result = ns["recipe_result"]
    assert result.recipe["models"] == ["math", "code"]
    assert_state_close(result.state_dict, task_arithmetic(llama_set.base, llama_set.models[:2], 0.4, [1, 2]))


def test_recipe_mistakes_are_one_line_usage_errors(shell, ns, capsys):
    beyond = "slices:\n  - sources:\n    - {model: base, layer_range: [0, 2]}\n    - {model: ft1, layer_range: [1, 5]}\n"
    cases = {
        "merge_method: rem\nmodels: [ft0]": "merge_method 'rem' is not supported",
        "merge_method: linear\nmodels: [ft0, x]\nname: x\n---\nmerge_method: linear\nmodels: [x, ft1]":
            "the merges 'x' → 'x' use each other's output",
        "merge_method: linear\nmodels: [ft0, nope]\nname: x\n---\nmerge_method: linear\nmodels: [x, ft1]":
            "model 'nope' is neither a notebook variable",
        "merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\n" + beyond:
            "ft1: layer_range [1, 5] is not within its 3 layers",
        "method: ties\nmodels: [ft0, ft1]\nbase: base\nparams: {densty: 0.3}": "unknown parameter 'densty'",
        "method: ties\nmodels: [ft0, nope]\nbase: base": "model 'nope' is neither a notebook variable",
        "method: ties\nmodels: [ft0\n": "not valid YAML",
    }
    for body, message in cases.items():
        assert message in usage_error(shell, capsys, f"%%merge\n{body}")


def test_import_registers_lazy_magics_and_config_does_too():
    code = "import nbmerge; get_ipython().run_line_magic('merge_methods', 'ties -o table'); print(table.rows[0]['name'])"
    out = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--no-banner", "-c", code],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("ties")
    config = json.dumps({"merge_methods": "nbmerge"})
    out = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--no-banner",
                          f"--MagicsManager.lazy_magics={config}", "-c", "%merge_methods slerp"],
                         capture_output=True, text=True, check=True).stdout
    assert "slerp" in out and "spherical" in out.lower()


# -- %merge_eval and %merge_sweep on the workbench's task pool ---------------------------------------------------
TASKS = "sentiment,subjectivity"


@pytest.fixture
def zoo_ns(shell, tiny_zoo):
    shell.user_ns.update(zoo_models=[str(p) for p in tiny_zoo.models.values()], zoo_base=str(tiny_zoo.base))
    magics = shell.magics_manager.registry["MergeMagics"]
    magics.__dict__.setdefault("_pools", {})["minilm-tiny"] = tiny_zoo.pool  # the pool the fixture built
    return shell.user_ns


def test_merge_eval_reports_the_pools_accuracy(shell, zoo_ns, tiny_zoo, capsys):
    run(shell, "%merge task_arithmetic zoo_models --base zoo_base --scaling 0.3 --quiet -o ta")
    run(shell, f"%merge_eval ta --pool minilm-tiny --tasks {TASKS} --quiet -o ta_report")
    report = zoo_ns["ta_report"]
    expected = nbmerge.evaluate(zoo_ns["ta"], tiny_zoo.pool, tasks=TASKS.split(","), progress=False)
    assert report.accuracy == expected.accuracy and list(report.accuracy) == TASKS.split(",")
    out = capsys.readouterr().out
    assert "EvalReport(" in out and "Figure" in out  # the table, then the bar chart (text forms in a plain shell)


def test_merge_sweep_merges_and_evaluates_each_value(shell, zoo_ns, tiny_zoo):
    run(shell, f"%merge_sweep task_arithmetic zoo_models --base zoo_base --param scaling --values 0,0.6 "
               f"--pool minilm-tiny --tasks {TASKS} -o curve")
    curve = zoo_ns["curve"]
    assert curve.values == [0.0, 0.6] and curve.param == "scaling"
    pretrained = nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, tasks=TASKS.split(","), progress=False)
    assert curve.reports[0].accuracy == pretrained.accuracy  # scaling 0 is the base model itself


@pytest.mark.parametrize("code, message", [
    ("%merge_eval nope --pool minilm-tiny", "model 'nope' is neither a notebook variable"),
    ("%merge_eval zoo_base --pool minilm-huge", "unknown task pool 'minilm-huge'"),
    ("%merge_eval zoo_base --pool minilm-tiny --tasks sentimnt", "sentimnt"),
    ("%merge_sweep ties zoo_models --base zoo_base --param densty --values 0.1", "ties has no parameter 'densty'"),
    ("%merge_sweep ties zoo_models --base zoo_base --param density --values 0.1,2", "must be in (0, 1], got 2"),
    ("%merge_sweep ties zoo_models --base zoo_base --param density --density 0.3 --values 0.1", "is swept"),
    ("%merge_sweep ties zoo_models --base zoo_base --values 0.1", "the following arguments are required: --param"),
])
def test_workbench_magic_mistakes_are_one_line_usage_errors(shell, zoo_ns, capsys, code, message):
    assert message in usage_error(shell, capsys, code)


def test_without_pool_the_magics_ask_for_one(monkeypatch, capsys):
    ipython = InteractiveShell.instance()
    ipython.run_line_magic("load_ext", "nbmerge")
    magics = ipython.magics_manager.registry["MergeMagics"]
    monkeypatch.setattr(magics, "__dict__", {k: v for k, v in magics.__dict__.items() if k != "_last_pool"})
    ipython.user_ns["lone"] = {"w": torch.zeros(2)}
    assert "choose a task pool with --pool NAME (registered: minilm-full, minilm-tiny, smollm2-chat, ta8-text, " \
        "ta8-text-tiny, vision-full, vision-tiny)" in \
        usage_error(ipython, capsys, "%merge_eval lone")


def test_merge_eval_takes_a_causal_lm_pool_held_in_a_variable(shell, capsys):
    from nbmerge.workbench.models.causal_lm import smollm2

    folder = smollm2()
    pool = nbmerge.lm_pool(folder, texts={"news": ["Rain is expected across the region tomorrow afternoon."]},
                           choices=[("The capital of France is", [" Paris", " Berlin"], 0)])
    shell.user_ns.update(lm=str(folder), lm_texts=pool)
    capsys.readouterr()
    run(shell, "%merge_eval lm --pool lm_texts --quiet -o lm_report")
    report = shell.user_ns["lm_report"]
    expected = nbmerge.evaluate(folder, pool, progress=False)
    assert (report.perplexity, report.accuracy) == (expected.perplexity, expected.accuracy)
    assert "perplexity" in capsys.readouterr().out
