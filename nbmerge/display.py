"""How merges and methods show in a notebook: the one-line merge summary and the table of registered methods."""

from __future__ import annotations

import html
import json


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB' (binary units, three significant figures)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1024
    raise AssertionError


def merge_summary(result, name: str | None = None) -> str:
    """One line: what was merged with which parameters, where it went, bytes and seconds."""
    report = result.report
    recipe = result.recipe
    where = f"-> {result.path}" if result.path is not None else f"{report.tensors} tensors in memory"
    target = f"{name} = " if name else ""
    read = f"read {human_bytes(report.bytes_read)} in {report.seconds:.2f} s on {report.device}"
    if "slices" in recipe:  # a layer stack
        pieces = ", ".join(f"{piece['method']} {' + '.join(f'{label}{r}' for label, r in piece['layers'].items())}"
                           for piece in recipe["slices"])
        return f"{target}layer stack of {len(recipe['slices'])} slice(s) ({pieces}): {where}; {read}"
    params = ", ".join(f"{key}={json.dumps(value)}" for key, value in recipe["params"].items())
    base = f" onto {recipe['base']}" if recipe["base"] is not None else ""
    return f"{target}{report.method}({params}) of {len(recipe['models'])} model(s){base}: {where}; {read}"


class MethodTable:
    """Every registered method with its plugin, version, model count, base use and parameters.

    Shown as an HTML table in notebooks and as text elsewhere; ``rows`` holds the same data as dicts.
    """

    def __init__(self, methods, versions: dict[str, str], flags: bool = False):
        self.flags = flags  # text form: parameters as command-line flags (--trim-scope) rather than names
        self.rows = []
        for method in methods:
            row = dict(method.describe(), plugin_version=versions.get(method.plugin, ""))
            for described, param in zip(row["params"], method.params):
                described["valid"] = param.range_text()
            self.rows.append(row)

    def _models_text(self, row: dict) -> str:
        low, high = row["min_models"], row["max_models"]
        return f"{low}" if low == high else f"{low}+" if high is None else f"{low}-{high}"

    def _param_text(self, param: dict) -> str:
        valid = f" {param['valid']}" if param["valid"] else ""
        if self.flags:
            return f"--{param['name'].replace('_', '-')} {json.dumps(param['default'])}{valid}"
        return f"{param['name']}={json.dumps(param['default'])}{valid}"

    def __str__(self) -> str:
        lines = []
        for row in self.rows:
            plugin = f"{row['plugin']} {row['plugin_version']}".strip()
            lines.append(f"{row['name']:<17} {row['summary']}  [plugin {plugin}; models {self._models_text(row)}; "
                         f"base {row['base']}]")
            lines += [f"    {self._param_text(p):<40} {p['help']}" for p in row["params"]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        cells = []
        for row in self.rows:
            params = "<br>".join(f"<code>{html.escape(self._param_text(p))}</code> {html.escape(p['help'])}"
                                 for p in row["params"]) or "—"
            cells.append(f"<tr><td><b>{html.escape(row['name'])}</b><br>{html.escape(row['summary'])}</td>"
                         f"<td>{html.escape(row['formula'])}</td>"
                         f"<td>{html.escape(row['plugin'])} {html.escape(row['plugin_version'])}</td>"
                         f"<td>{self._models_text(row)}</td><td>{row['base']}</td>"
                         f"<td style='text-align:left'>{params}</td></tr>")
        header = ("<tr><th>method</th><th>formula</th><th>plugin</th><th>models</th><th>base</th>"
                  "<th>parameters</th></tr>")
        return f"<table class='nbmerge-methods'>{header}{''.join(cells)}</table>"
