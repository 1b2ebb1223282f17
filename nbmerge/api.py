"""The Python API: ``merge`` and ``methods``. The CLI, the magics and the panels all call these."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nbmerge.engine.plan import make_plan
from nbmerge.engine.progress import ProgressEvent
from nbmerge.engine.run import (
    MergePart,
    Output,
    check_chat_template_output,
    check_output_apart,
    resolve_compute_dtype,
    resolve_device,
    resolve_dtype,
    run_parts,
)
from nbmerge.engine.sinks import parse_size
from nbmerge.errors import ParameterError
from nbmerge.io.chat_templates import choose_chat_template
from nbmerge.io.model_configs import check_configs_agree
from nbmerge.io.sources import ModelSource, open_model
from nbmerge.io.tokenizers import tokenizer_target
from nbmerge.io.vocabularies import check_padding, plan_vocabulary
from nbmerge.model_card import CardSource, GivenRecipe, method_line
from nbmerge.plugins import all_methods, get_method
from nbmerge.results import MergeResult, labelled_models, model_label, recipe_header


methods = all_methods  # every registered merge method by name (built-ins and installed plugins)


def merge(method: str, models: Sequence[Any] | Mapping[str, Any], base: Any = None, out: str | Path | None = None,
          *, device: str = "auto", out_dtype: str | torch.dtype | None = None, shard_size: int | str = "5GB",
          overwrite: bool = False, progress: bool = True, allow_nonfinite: bool = False,
          on_progress: Callable[[ProgressEvent], None] | None = None, cancel: threading.Event | None = None,
          pool: Any = None, split: str = "test", tokenizer_source: Any = None, pad_to_multiple_of: int | None = None,
          chat_template: str | None = None, compute_dtype: str | torch.dtype | None = None,
          given_recipe: GivenRecipe | None = None, allow_config_mismatch: bool = False,
          **params: Any) -> MergeResult:
    """Merge ``models`` with ``method`` and return a MergeResult.

    models: paths (safetensors file, Hugging Face folder, weights-only pickle), state dicts or nn.Modules, as a
      list or as a {name: model} dict (names appear in errors and the recipe). base: the pretrained model, for
      methods that use one. out: a folder (sharded safetensors + index, config and tokenizer files copied from
      the base or first model, a recipe file) or a ``.safetensors`` file; None merges in memory and returns the
      state dict. device: "cpu", "cuda", "cuda:N" or "auto". Arithmetic is float32 (float64 stays float64);
      tensors are stored in the reference model's dtype unless ``out_dtype`` is given.
      compute_dtype: run mergekit 0.1.5's arithmetic instead, op for op in this dtype ("bfloat16", ...; "inputs":
      each tensor's inputs' dtype), for mergekit's tensors bit for bit (what a mergekit recipe's ``dtype`` means;
      linear/weighted_average, task_arithmetic, ties, breadcrumbs, slerp, passthrough); tensors are then stored in
      it unless ``out_dtype`` is given. Less accurate than float32 for 16-bit dtypes, and not the fused kernels.
      Every check that headers allow (method, parameters, keys, shapes, dtypes, output path) runs before any
      tensor data is read.
      cancel: a ``threading.Event`` another thread may set (a panel's Stop button): the merge then stops after
      the tensor in hand (a module-building method: before its next training step), raises MergeCancelled and
      leaves no output behind.
      tokenizer_source: the model (a label, the object or path given) whose tokenizer the output gets instead of
      the base's (or first model's), or "union" (every model's tokens, as mergekit builds it); models whose
      vocabularies differ from it get their embedding and head rows permuted to its token ids, the rows it has
      that a model lacks filled as mergekit does (nbmerge.io.vocabularies), and the config its vocab_size.
      pad_to_multiple_of: with tokenizer_source, the vocabulary tensors' rows rounded up to a multiple of it,
      each model's extra rows the mean of its token rows (mergekit's ``tokenizer: {pad_to_multiple_of: ...}``).
      chat_template: the output folder's chat template: a built-in name (chatml, llama3, alpaca, mistral),
      "auto" (the most common among the models'), or Jinja text (``nbmerge.io.chat_templates``).
      given_recipe: the recipe this merge runs as the user wrote it (``nbmerge.run_recipe`` passes it): the output
      folder keeps it verbatim, in its README.md model card and as its own file (``nbmerge.model_card``).
      allow_nonfinite: merge inputs that hold NaN or Inf, and keep a result that does. By default such a tensor
      stops the merge with a NonFiniteError naming it (and its file), before anything is written.
      allow_config_mismatch: merge models whose config.json files disagree on the architecture (architectures,
      model_type, hidden_size, layer and head counts, vocab_size; nbmerge.io.model_configs), which is refused
      by default, as mergekit does without --allow-crimes.

    Methods that build a module (test-time adaptation on unlabeled inputs) need ``pool``, a task pool whose
    tasks are named like the models ({task: model}); they adapt on the inputs of ``split`` and ``out`` is a
    ``.safetensors`` file for what they trained (reload it with ``nbmerge.load_trained``).
    """
    merge_method = get_method(method)
    if merge_method.build_module is not None:
        from nbmerge.module_merge import build_merge

        return build_merge(merge_method, models, base, pool, params, split=split, out=out, overwrite=overwrite,
                           progress=progress, on_progress=on_progress, cancel=cancel,
                           allow_nonfinite=allow_nonfinite)
    if pool is not None:
        raise ParameterError(f"{merge_method.name}: merges tensor by tensor and uses no task pool; drop pool=...")
    labelled = labelled_models(models)
    checked = merge_method.validate(params, len(labelled), base is not None)
    compute = resolve_compute_dtype(compute_dtype, merge_method, checked)
    target_device = resolve_device(device)
    dtype = resolve_dtype(out_dtype)
    out_path = None if out is None else Path(out).expanduser()
    check_chat_template_output(chat_template, out_path)
    check_padding(pad_to_multiple_of, tokenizer_source)
    sources: list[ModelSource] = []
    vocabulary = None
    try:
        for label, model in labelled:
            sources.append(open_model(model, label))
        base_source = None if base is None else open_model(base, model_label(base, "base"))
        if base_source is not None:
            sources.append(base_source)
        if out_path is not None:
            check_output_apart(out_path, sources)
        if not allow_config_mismatch:
            check_configs_agree(sources, ignore=("vocab_size",) if tokenizer_source is not None else ())
        if tokenizer_source is not None:  # models whose vocabularies differ get their embedding rows permuted
            vocabulary = plan_vocabulary(tokenizer_target(tokenizer_source, sources, labelled, base)[0],
                                         tokenizer_source == "union", sources,
                                         None if base_source is None else len(sources) - 1,
                                         pad_to_multiple_of=pad_to_multiple_of)
        merged_sources = sources if vocabulary is None else vocabulary.sources
        model_sources = merged_sources[:len(labelled)]
        base_source = None if base_source is None else merged_sources[-1]
        plan = make_plan(merge_method, checked, model_sources, base_source, dtype, compute)
        recipe = recipe_header(merge_method, checked, [label for label, _ in labelled],
                               None if base is None else model_label(base, "base"),
                               out_dtype=None if dtype is None else str(dtype).removeprefix("torch."),
                               **({} if compute is None else {"compute_dtype": str(compute).removeprefix("torch.")}))
        part = MergePart(merge_method, checked, plan, model_sources, base_source)
        output = Output(out_path, recipe, parse_size(shard_size), overwrite,
                        base_source.folder if base_source is not None else model_sources[0].folder,
                        None if vocabulary is None else vocabulary.tokenizer_folder,
                        None if vocabulary is None else vocabulary.config_edits,
                        chat_template=choose_chat_template(chat_template, [source.folder for source in sources]),
                        card=CardSource((method_line(merge_method),), given_recipe))
        return run_parts([part], output, target_device, progress, on_progress, cancel, allow_nonfinite)
    finally:
        for source in sources:
            source.close()
        if vocabulary is not None:
            vocabulary.close()


