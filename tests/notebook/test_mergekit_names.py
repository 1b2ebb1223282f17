"""mergekit's method names and parameters in ``%merge`` and ``nbmerge merge``, mapped as a recipe maps them:
the results are mergekit 0.1.5's own (bit for bit where a dtype makes nbmerge run mergekit's arithmetic), names
are case-insensitive, and a misspelt name gets a "did you mean" that knows mergekit's names."""

from __future__ import annotations

import pytest
import torch
from helpers import load_folder
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

from nbmerge.cli import main

OPTIONS = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)


def run_mergekit(recipe: dict, out) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=OPTIONS)
    return load_folder(out)


def assert_equal(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    unequal = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not unequal, unequal[:3]


@pytest.fixture(scope="module")
def shell():
    ipython = InteractiveShell.instance()
    ipython.displayhook.flush = lambda: None
    ipython.run_line_magic("load_ext", "nbmerge")
    return ipython


def run(shell, code: str):
    result = shell.run_cell(code)
    for error in (result.error_before_exec, result.error_in_exec):
        if error is not None:
            raise error


def usage_error(shell, capsys, code: str) -> str:
    capsys.readouterr()
    result = shell.run_cell(code)
    assert type(result.error_in_exec) is UsageError, result.error_in_exec
    err = capsys.readouterr().err.strip()
    assert err.startswith("UsageError: ") and "\n" not in err, err
    return err


def test_linear_with_weights_is_mergekits_weighted_average(shell, bf16_llama_set, tmp_path):
    """nbmerge's linear interpolates two models; with --weights the line means mergekit's linear."""
    first, second = (str(path) for path in bf16_llama_set.model_dirs[:2])
    shell.user_ns.update(first=first, second=second)
    run(shell, "%merge linear first second --weights 0.7,0.3 --dtype bfloat16 --quiet -o mk_linear")
    theirs = run_mergekit({"merge_method": "linear", "dtype": "bfloat16",
                           "models": [{"model": first, "parameters": {"weight": 0.7}},
                                      {"model": second, "parameters": {"weight": 0.3}}]}, tmp_path / "mk")
    assert_equal(shell.user_ns["mk_linear"].state_dict, theirs)
    assert shell.user_ns["mk_linear"].recipe["method"] == "weighted_average"


def test_dare_ties_by_its_mergekit_name_in_any_case(shell, llama_set, tmp_path):
    """DARE-TIES without drops (density 1) is deterministic: mergekit's dare_ties to float32 rounding."""
    base, first, second = str(llama_set.base_dir), *(str(path) for path in llama_set.model_dirs[:2])
    shell.user_ns.update(base=base, first=first, second=second)
    run(shell, "%merge DARE-TIES first second --base base --weight 0.6,0.4 --density 1 --lambda 0.9 --quiet "
               "-o mk_dare")
    theirs = run_mergekit({"merge_method": "dare_ties", "base_model": base, "parameters": {"lambda": 0.9},
                           "models": [{"model": first, "parameters": {"weight": 0.6, "density": 1}},
                                      {"model": second, "parameters": {"weight": 0.4, "density": 1}}]},
                          tmp_path / "mk")
    merged = shell.user_ns["mk_dare"]
    assert merged.recipe["method"] == "dare" and merged.recipe["params"]["combine"] == "ties"
    worst = max(float((merged.state_dict[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst <= 2e-6


def test_the_cli_runs_mergekit_ties_with_its_dtype_bit_for_bit(bf16_llama_set, tmp_path):
    base, *models = (str(path) for path in (bf16_llama_set.base_dir, *bf16_llama_set.model_dirs))
    assert main(["merge", "ties", *models, "--base", base, "--weight", "0.3,0.5,0.2", "--density", "0.4",
                 "--lambda", "1.2", "--dtype", "bfloat16", "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    theirs = run_mergekit({"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                           "parameters": {"density": 0.4, "lambda": 1.2},
                           "models": [{"model": m, "parameters": {"weight": w}}
                                      for m, w in zip(models, (0.3, 0.5, 0.2))]},
                          tmp_path / "mk")
    assert_equal(load_folder(tmp_path / "ours"), theirs)


def test_method_names_are_case_insensitive(shell, llama_set):
    shell.user_ns.update(ft0=llama_set.models[0], ft1=llama_set.models[1], base=llama_set.base)
    run(shell, "%merge Task_Arithmetic ft0 ft1 --base base --scaling 0.5 --quiet -o upper")
    run(shell, "%merge task_arithmetic ft0 ft1 --base base --scaling 0.5 --quiet -o lower")
    assert_equal(shell.user_ns["upper"].state_dict, shell.user_ns["lower"].state_dict)


def test_a_misspelt_name_suggests_mergekits_name_and_its_equivalent(shell, capsys):
    err = usage_error(shell, capsys, "%merge dare_tie a b")
    assert "did you mean 'dare_ties' (mergekit's; nbmerge's dare with combine='ties')?" in err
    err = usage_error(shell, capsys, "%merge_methods dare_ties")
    assert "mergekit's name for nbmerge's dare with combine='ties'" in err


def test_a_per_model_value_list_of_the_wrong_length_is_one_line(shell, capsys, llama_set):
    shell.user_ns.update(ft0=llama_set.models[0], ft1=llama_set.models[1], base=llama_set.base)
    err = usage_error(shell, capsys, "%merge dare_linear ft0 ft1 --base base --weight 1,2,3")
    assert "--weight has 3 values for 2 models" in err


def test_the_cli_suggests_mergekit_names(capsys):
    assert main(["merge", "della_lin", "a", "b"]) != 0
    assert "did you mean 'della_linear' (mergekit's; nbmerge's della with combine='linear')?" in capsys.readouterr().err
