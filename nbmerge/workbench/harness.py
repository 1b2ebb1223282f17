"""A bridge to EleutherAI's lm-evaluation-harness (``lm_eval``, the extra ``nbmerge[lmeval]``): its tasks run on a
merge held in memory or on disk, the field's standard numbers next to nbmerge's own pool scores.

``evaluate_harness(model, tasks)`` loads the model once as nbmerge loads any causal LM (``causal_lm.load_causal_lm``:
its own config when it is a folder, else ``tokenizer``'s folder's; weights that do not fit are refused), wraps it
in lm_eval's ``HFLM`` and calls ``lm_eval.simple_evaluate``. Tasks are lm_eval's registered ones (which may
download their data sets) or your own: ``include_path`` is a folder of lm_eval task YAML files, whose data can be a
local JSON file (``dataset_path: json``, ``dataset_kwargs: {data_files: {test: FILE}}``), which runs offline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

from nbmerge.errors import NBMergeError, ParameterError
from nbmerge.workbench.models import causal_lm


@dataclass
class HarnessReport:
    """lm_eval's scores of one model: ``results[task][metric]`` (e.g. ``acc``, ``acc_norm``, ``word_perplexity``),
    with ``stderr[task][metric]`` where lm_eval gives one, and the number of documents scored per task."""

    model: str
    results: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per (task, metric): task, metric, value, stderr (None when lm_eval gives none), documents."""
        return [{"task": task, "metric": metric, "value": value, "stderr": self.stderr.get(task, {}).get(metric),
                 "documents": self.documents.get(task)}
                for task, metrics in self.results.items() for metric, value in metrics.items()]

    def __str__(self) -> str:
        lines = [f"{self.model}: lm_eval ({_settings_text(self.settings)})",
                 f"{'task':<24}{'metric':<18}{'value':>10}{'± stderr':>10}{'docs':>6}"]
        for row in self.rows:
            lines.append(f"{row['task']:<24}{row['metric']:<18}{row['value']:>10.4f}{_number(row['stderr']):>10}"
                         f"{row['documents'] or '':>6}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td>{escape(r['task'])}</td><td>{escape(r['metric'])}</td><td>{r['value']:.4f}</td>"
                       f"<td>{_number(r['stderr'])}</td><td>{r['documents'] or ''}</td></tr>" for r in self.rows)
        return (f"<table><caption>{escape(self.model)}: lm_eval ({escape(_settings_text(self.settings))})</caption>"
                "<thead><tr><th>task</th><th>metric</th><th>value</th><th>± stderr</th><th>docs</th></tr></thead>"
                f"<tbody>{body}</tbody></table>")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _settings_text(settings: dict) -> str:
    parts = [f"{settings.get('num_fewshot') or 0}-shot"]
    if settings.get("limit") is not None:
        parts.append(f"limit {settings['limit']}")
    if settings.get("apply_chat_template"):
        parts.append("chat template")
    return ", ".join(parts)


def evaluate_harness(model: Any, tasks: Sequence[str] | str, *, tokenizer: str | Path | None = None,
                     include_path: str | Path | Sequence[str | Path] | None = None, num_fewshot: int | None = None,
                     limit: int | float | None = None, batch_size: int = 8, device: str = "cpu",
                     apply_chat_template: bool = False, name: str | None = None,
                     bootstrap_iters: int = 0, seed: int = 0) -> HarnessReport:
    """Run lm-evaluation-harness ``tasks`` on ``model`` (a folder, state dict, MergeResult or module).

    tokenizer: the folder whose tokenizer (and config, for a model that is not a folder) is used; default: the
    model's own folder. include_path: folders of your own lm_eval task YAML files. limit: at most this many
    documents per task (a fraction: that share). bootstrap_iters: lm_eval's bootstrap for the standard errors
    (0: none; its default is 100000, minutes on a CPU).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise NBMergeError("evaluate_harness needs lm-evaluation-harness: pip install 'nbmerge[lmeval]'") from None

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ParameterError("evaluate_harness: give one or more lm_eval task names")
    folder = Path(tokenizer) if tokenizer is not None else causal_lm.config_folder_of(model, "")
    if str(folder) in ("", ".") or not (folder / "config.json").is_file():
        raise ParameterError("evaluate_harness: the model is not a folder with a config; pass tokenizer=FOLDER "
                             "(the base's folder)")
    started = time.perf_counter()
    module = causal_lm.load_causal_lm(model, folder).to(device)  # weights that do not fit fail before the tasks load
    includes = None if include_path is None else (
        [str(include_path)] if isinstance(include_path, (str, Path)) else [str(p) for p in include_path])
    # your own folders alone when they hold every task: lm_eval's own index takes about half a minute to build
    manager = TaskManager(include_path=includes, include_defaults=False) if includes else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=includes)
    unknown = [task for task in names if task not in manager.all_tasks]
    if unknown:
        where = f"lm_eval's own or in {', '.join(includes)}" if includes else \
            "lm_eval's own; your own task YAML folders go in include_path"
        raise ParameterError(f"evaluate_harness: no task named {unknown[0]!r} ({where})")
    wrapped = HFLM(pretrained=module, tokenizer=causal_lm.tokenizer_of(str(folder)), batch_size=batch_size,
                   device=device)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                     task_manager=manager, apply_chat_template=apply_chat_template,
                                     bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                                     numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results, stderr = {}, {}
    for task, metrics in output["results"].items():
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if not isinstance(value, (int, float)) or metric in ("alias", "sample_len"):
                continue
            if metric.endswith("_stderr"):
                stderr.setdefault(task, {})[metric.removesuffix("_stderr")] = float(value)
            else:
                results.setdefault(task, {})[metric] = float(value)
    documents = {task: int(count.get("effective", count.get("original", 0)))
                 for task, count in output.get("n-samples", {}).items()}
    settings = {"num_fewshot": num_fewshot, "limit": limit, "apply_chat_template": apply_chat_template,
                "batch_size": batch_size, "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else ""}
    return HarnessReport(name or _model_name(model), results, stderr, documents, settings,
                         round(time.perf_counter() - started, 2))


def _model_name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).name
    recipe = getattr(model, "recipe", None)
    return recipe.get("method", "merge") if recipe else type(model).__name__
