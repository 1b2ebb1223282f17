"""The plugin seam: third-party discovery through a real entry point, duplicates, autoload switch, lazy import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import nbmerge
from nbmerge import plugins
from nbmerge.errors import PluginError

BUILTIN = {"adamerging", "arcee_fusion", "breadcrumbs", "dare", "della", "doge_ta", "expo", "fisher_merging", "iso_c",
           "iso_cts", "karcher", "linear", "magmax", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough",
           "ram", "ramplus_tl", "regmean", "regmean_plusplus", "sce", "simple_average", "slerp", "tall_mask",
           "task_arithmetic", "ties", "tsv_m", "we_moe", "weighted_average", "wudi"}

PLUGIN_SOURCE = textwrap.dedent('''
    """A third-party plugin: the elementwise median of the models."""
    import torch
    import nbmerge
    from nbmerge.method.params import Param

    def _median(job):
        shift = job.params["shift"]
        return torch.stack(job.models).median(dim=0).values + shift

    @nbmerge.hookimpl
    def register_merge_methods(register):
        register(nbmerge.MergeMethod(
            name="{name}", summary="elementwise median", formula="θ = median_i θ_i + shift",
            params=(Param("shift", "float", 0.0, "added to the median"),), merge_tensor=_median, min_models=3))
''')


def install_fake_distribution(root, module: str, method_name: str, dist: str) -> None:
    """A real *.dist-info with entry_points.txt on sys.path: what pip would leave behind, without pip."""
    (root / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=method_name))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"  # pip normalises the folder name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[nbmerge]\n{module} = {module}\n")


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    plugins.reload_plugins()
    yield
    plugins.reload_plugins()


def test_builtin_methods_are_registered_through_entry_points(fresh_registry):
    methods = nbmerge.methods()
    assert BUILTIN <= set(methods)
    assert methods["ties"].plugin == "ties"
    assert plugins.plugin_versions()["ties"] == nbmerge.__version__


def test_third_party_plugin_is_discovered_and_merges(tmp_path, fresh_registry):
    install_fake_distribution(tmp_path, "nbmerge_median", "median", "nbmerge-median")
    sys.path.insert(0, str(tmp_path))
    plugins.reload_plugins()
    assert nbmerge.methods()["median"].plugin == "nbmerge_median"
    assert plugins.plugin_versions()["nbmerge_median"] == "1.2.3"
    models = [{"w": torch.tensor([1.0, 5.0, -2.0])}, {"w": torch.tensor([3.0, 4.0, 0.0])},
              {"w": torch.tensor([2.0, 9.0, 7.0])}]
    merged = nbmerge.merge("median", models, shift=0.5, progress=False).state_dict["w"]
    assert merged.tolist() == [2.5, 5.5, 0.5]


def test_autoload_switch_keeps_builtins_and_skips_third_party(tmp_path, fresh_registry, monkeypatch):
    install_fake_distribution(tmp_path, "nbmerge_median", "median", "nbmerge-median")
    sys.path.insert(0, str(tmp_path))
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    plugins.reload_plugins()
    assert set(nbmerge.methods()) == BUILTIN


def test_a_plugin_that_raises_on_import_is_listed_as_broken_and_the_rest_work(tmp_path, fresh_registry, capsys):
    from nbmerge.cli import main as cli_main

    install_fake_distribution(tmp_path, "nbmerge_median", "median", "nbmerge-median")
    install_fake_distribution(tmp_path, "nbmerge_broken", "broken", "nbmerge-broken")
    (tmp_path / "nbmerge_broken.py").write_text("import torch\nraise RuntimeError('needs a GPU driver')\n")
    sys.path.insert(0, str(tmp_path))
    plugins.reload_plugins()
    with pytest.warns(UserWarning, match=r"plugin 'nbmerge_broken' \(nbmerge-broken 1.2.3\) failed to import"):
        methods = nbmerge.methods()
    assert BUILTIN | {"median"} == set(methods)
    assert plugins.broken_plugins() == {"nbmerge_broken": "RuntimeError: needs a GPU driver"}
    merged = nbmerge.merge("median", [{"w": torch.tensor([float(i)])} for i in (1, 7, 3)], progress=False)
    assert merged.state_dict["w"].tolist() == [3.0]
    assert cli_main(["methods"]) == 0
    assert "broken plugin nbmerge_broken: RuntimeError: needs a GPU driver" in capsys.readouterr().out


def test_duplicate_method_names_name_both_plugins(tmp_path, fresh_registry):
    install_fake_distribution(tmp_path, "nbmerge_ties_clash", "ties", "nbmerge-ties-clash")
    sys.path.insert(0, str(tmp_path))
    plugins.reload_plugins()
    with pytest.raises(PluginError, match=r"'ties'.*two plugins.*(nbmerge_ties_clash.*'ties'|'ties'.*nbmerge_ties_clash)"):
        nbmerge.methods()


def test_plugin_registered_at_run_time(fresh_registry):
    class NotebookPlugin:
        @nbmerge.hookimpl
        def register_merge_methods(self, register):
            register(nbmerge.MergeMethod(name="first_model", summary="the first model", formula="θ = θ_1",
                                         params=(), merge_tensor=lambda job: job.models[0] * 1, min_models=1))

    nbmerge.register_plugin(NotebookPlugin(), name="notebook")
    merged = nbmerge.merge("first_model", [{"w": torch.ones(2)}], progress=False).state_dict["w"]
    assert merged.tolist() == [1.0, 1.0]
    nbmerge.unregister_plugin("notebook")
    assert "first_model" not in nbmerge.methods()


def test_registering_something_else_is_a_plugin_error(fresh_registry):
    class Broken:
        @nbmerge.hookimpl
        def register_merge_methods(self, register):
            register({"name": "dict-not-method"})

    nbmerge.register_plugin(Broken(), name="broken")
    with pytest.raises(PluginError, match="broken"):
        nbmerge.methods()


def test_import_is_lazy():
    """`import nbmerge` loads neither torch, the engine nor any plugin (they load on first use): only the hook
    markers, the version and the magics' names."""
    code = ("import sys, nbmerge; loaded = [m for m in sys.modules if m.startswith(('nbmerge.', 'nbmerge_plugins'))];"
            "print(__import__('json').dumps(sorted(loaded)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["nbmerge.hookspecs", "nbmerge.notebook", "nbmerge.version"]
    assert "torch" not in subprocess.run([sys.executable, "-c", "import sys, nbmerge; print(list(sys.modules))"],
                                         capture_output=True, text=True, check=True).stdout.split("'")
