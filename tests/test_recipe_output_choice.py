"""Where a merge is written, and whether it may replace what is there, is the caller's choice, never a recipe's:
a recipe someone else wrote with ``out: ../victim`` and ``overwrite: true`` is refused (RecipeError naming the key
and the flag to pass instead) by the parser, the CLI and the %%merge magic, and the folder it names is untouched."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nbmerge.cli import main
from nbmerge.recipes import RecipeError, parse_recipe, run_recipe

NBMERGE = "method: simple_average\nmodels: [{a}, {b}]\n"
MERGEKIT = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n"
STACK = "slices:\n  - models: [{a}]\n    layers: [0, 1]\n"
CHAIN = ("name: first\nmethod: simple_average\nmodels: [{a}, {b}]\n---\n"
         "method: simple_average\nmodels: [first, {b}]\n")
FORMATS = {"nbmerge": NBMERGE, "mergekit": MERGEKIT, "stack": STACK, "chain": CHAIN}


@pytest.fixture
def victim(tmp_path):
    """A folder the recipe's author would like gone, with what it holds."""
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("years of work")
    return folder


@pytest.fixture
def inputs(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"in{i}.safetensors"
        save_file({"w": torch.full((4,), float(i + 1))}, path)
        paths.append(path)
    return paths


def hostile(template: str, inputs, victim, keys: str) -> str:
    text = template.format(a=inputs[0], b=inputs[1])
    return text + keys.format(victim=victim) if "---" not in text else \
        text.replace("---\n", keys.format(victim=victim) + "---\n", 1)


@pytest.mark.parametrize("keys, named", [("out: {victim}\noverwrite: true\n", "out"),
                                         ("out: {victim}\n", "out"), ("overwrite: true\n", "overwrite")])
@pytest.mark.parametrize("form", list(FORMATS))
def test_a_recipe_cannot_choose_the_output_or_to_overwrite(inputs, victim, form, keys, named):
    text = hostile(FORMATS[form], inputs, victim, keys)
    flag = "--out DIR" if named == "out" else "--overwrite"
    with pytest.raises(RecipeError, match=rf"recipe: '{named}' is not taken from a recipe: .* pass {flag}"):
        parse_recipe(text)
    assert os.listdir(victim) == ["notes.txt"] and (victim / "notes.txt").read_text() == "years of work"


def test_the_cli_refuses_such_a_recipe_and_leaves_the_folder(tmp_path, inputs, victim, capsys):
    recipe = tmp_path / "downloaded.yml"
    recipe.write_text(hostile(NBMERGE, inputs, victim, "out: {victim}\noverwrite: true\n"))
    assert main(["merge", "--recipe", str(recipe), "--quiet"]) == 1
    assert "'out' is not taken from a recipe" in capsys.readouterr().err
    assert main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "mine"), "--overwrite", "--quiet"]) == 1
    assert os.listdir(victim) == ["notes.txt"] and not (tmp_path / "mine").exists()


def test_the_caller_chooses_and_the_recipe_merges(tmp_path, inputs, victim, capsys):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(NBMERGE.format(a=inputs[0], b=inputs[1]))
    assert main(["merge", "--recipe", str(recipe), "--quiet"]) == 2  # no --out: nowhere to write
    assert "say where the merge goes: --out DIR" in capsys.readouterr().err
    assert main(["merge", "--recipe", str(recipe), "--out", str(victim), "--quiet"]) == 1  # exists, no --overwrite
    assert os.listdir(victim) == ["notes.txt"]
    assert main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    assert torch.equal(load_file(tmp_path / "merged" / "model.safetensors")["w"], torch.full((4,), 1.5))
    result = run_recipe(parse_recipe(recipe.read_text()), out=tmp_path / "merged", overwrite=True, progress=False)
    assert result.path == tmp_path / "merged"


def test_the_merge_magic_refuses_it_too(tmp_path, inputs, victim, capsys):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbmerge")
    cell = hostile(NBMERGE, inputs, victim, "out: {victim}\noverwrite: true\n")
    result = shell.run_cell(f"%%merge --quiet\n{cell}")
    assert type(result.error_in_exec) is UsageError, result.error_in_exec
    assert "'out' is not taken from a recipe" in str(result.error_in_exec)
    assert os.listdir(victim) == ["notes.txt"]
