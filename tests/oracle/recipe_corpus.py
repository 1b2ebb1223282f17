"""Runs the corpus of real mergekit recipes (tests/fixtures/mergekit_corpus) through nbmerge and mergekit 0.1.5.

Each recipe is first parsed as written: a refusal there is one line naming the field. A recipe nbmerge takes is then
run by both tools with every model reference (base_model, sources, tokenizer source) replaced by a small Llama
checkpoint built here, with as many layers as the recipe's layer ranges need (``model+adapter``: that checkpoint
with a seeded PEFT LoRA adapter; several documents: mergekit-multimerge's task graph), and the outputs are compared:
equal, or, for methods with random masks (DARE and DELLA with density < 1), the same tensors with task-vector norms
within 15% of mergekit's. Where nbmerge has the method's mergekit arithmetic (linear, task_arithmetic, ties,
breadcrumbs, slerp, passthrough: ``MergeMethod.mergekit_tensor``) the recipe runs as written, in its own ``dtype``,
and equal means bit for bit; the other methods compute in float32 in nbmerge, so a 16-bit recipe of theirs runs
both in float32 here and equal means to float32 tolerance on all but 0.1% of entries.
``scripts/recipe_corpus.py`` writes the table to docs/recipe-corpus.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "mergekit_corpus"
REPORT = Path(__file__).resolve().parents[2] / "docs" / "recipe-corpus.md"
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
HALF_DTYPES = ("bfloat16", "float16", "bf16", "fp16", "half")


@dataclass
class CaseResult:
    name: str  # the corpus file
    method: str  # merge_method as written (or "?" where the YAML does not parse)
    status: str  # "equal", "same distribution", "refused", "mergekit refuses"
    detail: str  # the largest difference, the norm ratio, or the one-line refusal


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.yml"))


def run_case(path: Path, workdir: Path) -> CaseResult:
    from nbmerge.errors import NBMergeError
    from nbmerge.recipes import parse_recipe

    text = path.read_text()
    method = _method_as_written(text)
    try:
        parse_recipe(text)
    except NBMergeError as exc:
        return CaseResult(path.name, method, "refused", f"{exc} [mergekit: {mergekit_verdict(text, workdir, path)}]")
    documents, models = localised(list(yaml.safe_load_all(text)), workdir)  # several: a mergekit-multi chain
    written_dtype = documents[-1].get("out_dtype") or documents[-1].get("dtype")
    exact = [_has_mergekit_arithmetic(document) for document in documents]
    documents = [document if arithmetic else in_float32(document) for document, arithmetic in zip(documents, exact)]
    local = documents[-1]
    theirs_dir = workdir / f"mk-{path.stem}"
    templated = local.get("chat_template") is not None  # then both write a tokenizer whose templates are compared
    try:
        theirs = (run_mergekit(local, theirs_dir, copy_tokenizer=templated) if len(documents) == 1
                  else run_mergekit_chain(documents, theirs_dir))
    except Exception as exc:  # noqa: BLE001 - mergekit's own refusal, recorded as such
        return CaseResult(path.name, method, "mergekit refuses", f"{type(exc).__name__}: {exc}".splitlines()[0])
    from nbmerge.recipes import run_recipe

    ours_dir = workdir / f"nb-{path.stem}" if templated else None
    recipe = json.dumps(local) if len(documents) == 1 else yaml.safe_dump_all(documents)
    try:
        merged = run_recipe(parse_recipe(recipe), out=ours_dir, overwrite=True if templated else None,
                            progress=False)
    except NBMergeError as exc:
        return CaseResult(path.name, method, "refused", str(exc))
    ours = merged.state_dict if ours_dir is None else _load_folder(ours_dir)
    if templated and chat_rendering(ours_dir) != chat_rendering(theirs_dir):
        return CaseResult(path.name, method, "different", "the output tokenizers' chat templates render differently")
    if set(ours) != set(theirs):
        return CaseResult(path.name, method, "different", f"tensors differ: {sorted(set(ours) ^ set(theirs))[:3]}")
    if any(document.get("merge_method") in RANDOM_METHODS and _has_drops(document) for document in documents):
        base = _base_state(models)
        ratio = _norm_ratio(ours, theirs, base)
        status = "same distribution" if abs(ratio - 1) <= 0.15 else "different"
        return CaseResult(path.name, method, status, f"random masks; ‖Δ‖ ratio {ratio:.3f}")
    if all(exact):
        unequal = sum(int((ours[k] != theirs[k]).sum()) if ours[k].dtype == theirs[k].dtype else ours[k].numel()
                      for k in theirs)
        if unequal:
            return CaseResult(path.name, method, "different",
                              f"{unequal} of {sum(v.numel() for v in theirs.values())} entries not bit-identical")
        template = "; chat templates render alike" if templated else ""
        computed_in = documents[-1].get("dtype") or "the checkpoints' float32"
        return CaseResult(path.name, method, "equal", f"bit for bit, computed in {computed_in}{template}")
    worst, mismatched = _difference(ours, theirs)
    computed = f" (both computed in float32; the recipe's {written_dtype})" if written_dtype in HALF_DTYPES else ""
    if worst <= 1e-5 or mismatched <= 1e-3:
        template = "; chat templates render alike" if templated else ""
        return CaseResult(path.name, method, "equal", f"max |Δ| {worst:.1e}{computed}{template}")
    return CaseResult(path.name, method, "different", f"max |Δ| {worst:.2e}; {mismatched:.2%} of entries off")


def mergekit_verdict(text: str, workdir: Path, path: Path) -> str:
    """What mergekit 0.1.5 does with a recipe nbmerge refuses, on the same stand-in checkpoints."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return "not valid YAML (or several documents) for mergekit's loader either"
    if not isinstance(config, dict):
        return "not a mapping"
    try:
        local, _ = localised([config], workdir)
        run_mergekit(local[0], workdir / f"mk-refused-{path.stem}")
    except Exception as exc:  # noqa: BLE001 - mergekit's own refusal, recorded as such
        return f"refuses too ({type(exc).__name__})"
    return "runs it"


def _method_as_written(text: str) -> str:
    found = re.search(r"^\s*merge_method:\s*([A-Za-z_]+)", text, re.MULTILINE)
    return found.group(1) if found else "?"


def references(config: dict) -> list[str]:
    """Every model the recipe names, in order: base_model first, then sources, then the tokenizer source."""
    found: list[str] = []

    def add(reference):
        if isinstance(reference, str) and reference not in found:
            found.append(reference)

    add(config.get("base_model"))
    for entry in config.get("models") or []:
        add(entry if isinstance(entry, str) else entry.get("model"))
    for piece in config.get("slices") or []:
        for source in piece.get("sources") or []:
            add(source.get("model"))
    source = config.get("tokenizer_source") or (config.get("tokenizer") or {}).get("source")
    if isinstance(source, str) and source not in ("base", "union"):
        add(source.removeprefix("model:"))
    return found


def layers_needed(config: dict) -> int:
    ends = [source["layer_range"][1] for piece in config.get("slices") or []
            for source in piece.get("sources") or [] if source.get("layer_range")]
    return max(ends, default=4)


def _has_mergekit_arithmetic(document: dict) -> bool:
    """Whether nbmerge runs this recipe document with mergekit's arithmetic (its options carry compute_dtype)."""
    from nbmerge.recipes import parse_recipe

    return "compute_dtype" in parse_recipe(json.dumps(document)).options


def in_float32(document: dict) -> dict:
    """mergekit computes in the recipe's dtype, nbmerge in float32: a 16-bit recipe is compared in float32."""
    if (document.get("out_dtype") or document.get("dtype")) not in HALF_DTYPES:
        return document
    return {**{key: value for key, value in document.items() if key != "out_dtype"}, "dtype": "float32"}


def localised(documents: list[dict], workdir: Path) -> tuple[list[dict], dict[str, Path]]:
    """The recipe's documents with each model reference replaced by a local checkpoint folder (the first
    base_model by the base); the names of a chain's own merges stay as they are."""
    from nbmerge.workbench.models.synthetic_llama import LlamaShape, build_llama_set

    chained = {document.get("name") for document in documents} - {None}
    written = list(dict.fromkeys(name for document in documents for name in references(document)
                                 if name not in chained))
    names = list(dict.fromkeys(name.split("+")[0] for name in written))  # model+adapter: the model's stand-in
    layers = max(layers_needed(document) for document in documents)
    config = documents[0]
    n_models = max(1, len(names) - 1)
    shape = LlamaShape(layers=layers, hidden=16, intermediate=32, vocab=64, heads=2, kv_heads=1)
    checkpoints = build_llama_set(workdir / f"llama-{layers}x{n_models}", shape, n_models=n_models, noise=0.01)
    folders = [checkpoints.base, *checkpoints.models]
    for folder in folders:
        _write_tokenizer(folder, shape.vocab)
    if config.get("base_model") is None:
        folders = folders[1:] + folders[:1]  # no base: the references take the fine-tunes first
    mapping = {name: str(folder) for name, folder in zip(names, folders)}
    for number, name in enumerate(written):
        if "+" in name:  # a stand-in LoRA adapter (seeded by its place in the recipe) on the model's stand-in
            model = mapping[name.split("+")[0]]
            adapter = workdir / f"lora-{Path(model).name}-{number}"
            _write_adapter(Path(model), adapter, seed=number)
            mapping[name] = f"{model}+{adapter}"
    def replaced(value, key=None):
        if isinstance(value, dict):
            return {k: replaced(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [replaced(v, key) for v in value]
        if key in ("model", "base_model") and isinstance(value, str):
            return mapping.get(value, value)
        if key in ("tokenizer_source", "source") and isinstance(value, str) and value not in ("base", "union"):
            return mapping.get(value.removeprefix("model:"), value)
        return value

    return [replaced(document) for document in documents], {name: Path(f) for name, f in mapping.items()}


def _write_adapter(model: Path, out: Path, seed: int) -> None:
    """A PEFT LoRA adapter (r = 4, α = 8, on q, v and down projections) with seeded random A and B."""
    if (out / "adapter_config.json").exists():
        return
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(out)


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """One word-level tokenizer shared by every checkpoint (mergekit's tokenizer_source needs tokenizer files)."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def chat_rendering(folder: Path) -> str:
    """A system/user/assistant/user conversation rendered by the chat template of the tokenizer in ``folder``."""
    from transformers import AutoTokenizer

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(conversation, tokenize=False,
                                                                     add_generation_prompt=True)


def run_mergekit(config: dict, out: Path, copy_tokenizer: bool = False) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(device="cpu", copy_tokenizer=copy_tokenizer, write_model_card=False, quiet=True,
                           random_seed=0, lora_merge_cache=str(out.parent / f"{out.name}-lora-cache"))
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return _load_folder(out)


def run_mergekit_chain(documents: list[dict], out: Path) -> dict[str, torch.Tensor]:
    """mergekit-multimerge's own loader and task graph; the final merge goes to ``out``."""
    from mergekit.graph import Executor
    from mergekit.merge import MergeOptions
    from mergekit.scripts.multimerge import load_config, make_tasks

    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                           lora_merge_cache=str(out.parent / f"{out.name}-lora-cache"))
    steps = out.with_name(out.name.replace("+", "_") + "-steps")  # mergekit reads a '+' as model+LoRA
    configs, dependencies = load_config(yaml.safe_dump_all(documents), str(steps))
    if None not in configs:  # every document named: the final one is the merge no other uses
        final = next(name for name in configs if not any(name in used for used in dependencies.values()))
        configs[None] = configs.pop(final)
        dependencies[None] = dependencies.pop(final)
    Executor(make_tasks(configs, dependencies, options, str(steps), str(out), lazy=False),
             math_device="cpu", storage_device="cpu").execute()
    return _load_folder(out)


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _has_drops(config: dict) -> bool:
    densities = []

    def collect(value, key=None):
        if isinstance(value, dict):
            for k, v in value.items():
                collect(v, k)
        elif isinstance(value, list):
            for v in value:
                collect(v, key)
        elif key in ("density", "value") and isinstance(value, (int, float)):
            densities.append(value)

    collect({k: v for k, v in config.items() if k in ("parameters", "models", "slices")})
    return any(d < 1 for d in densities) or not densities


def _base_state(models: dict[str, Path]) -> dict[str, torch.Tensor]:
    return _load_folder(next(iter(models.values())))


def _norm_ratio(ours: dict, theirs: dict, base: dict) -> float:
    ours_norm = sum(float((ours[k].float() - base[k].float()).norm() ** 2) for k in ours if k in base) ** 0.5
    theirs_norm = sum(float((theirs[k].float() - base[k].float()).norm() ** 2) for k in theirs if k in base) ** 0.5
    return ours_norm / theirs_norm if theirs_norm else float("inf")


def _difference(ours: dict, theirs: dict) -> tuple[float, float]:
    """The largest |ours − theirs|, and the fraction of entries off by more than one 16-bit rounding step."""
    worst, off, total = 0.0, 0, 0
    for name, expected in theirs.items():
        got, want = ours[name].double(), expected.double()
        difference = (got - want).abs()
        worst = max(worst, float(difference.max()))
        step = want.abs() * 2.0 ** -7 + 1e-6 if expected.dtype in (torch.bfloat16, torch.float16) else 1e-5
        off += int((difference > step).sum())
        total += want.numel()
    return worst, off / max(total, 1)


def markdown(results: list[CaseResult]) -> str:
    counts = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    lines = [
        "# Real mergekit recipes through nbmerge",
        "",
        f"{len(results)} recipes published with merged models (sources in tests/fixtures/mergekit_corpus/SOURCES.md),",
        "each parsed as written, then run by nbmerge and by mergekit 0.1.5 on small local Llama checkpoints standing",
        "in for the models it names (as many layers as its layer ranges need; a `model+adapter` reference: that",
        "checkpoint with a seeded PEFT LoRA adapter built here; several YAML documents: mergekit-multimerge's own",
        "task graph). Written by `scripts/recipe_corpus.py`;",
        "`tests/oracle/test_recipe_corpus.py` checks every row again. Where nbmerge refuses, the row says what",
        "mergekit does with the same recipe: mergekit ignores keys it does not know (a typo such as",
        "`tokenzer_source` then silently changes the merge), nbmerge names them.",
        "",
        "A recipe's `dtype` is the dtype mergekit 0.1.5 computes in and `out_dtype` the output's; for the methods",
        "whose mergekit arithmetic nbmerge has (linear, task_arithmetic, ties, breadcrumbs, slerp, passthrough)",
        "each recipe runs as written and \"bit for bit\" means every tensor is identical. The other methods compute",
        "in float32 in nbmerge, so a 16-bit recipe of theirs is run by both in float32 here.",
        "",
        "Summary: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) + ".",
        "",
        "| recipe | merge_method | result | detail |",
        "|---|---|---|---|",
    ]
    for result in results:
        detail = result.detail.replace("|", "\\|")
        lines.append(f"| {result.name} | {result.method} | {result.status} | {detail} |")
    return "\n".join(lines) + "\n"


def report_rows(text: str) -> dict[str, tuple[str, str]]:
    """recipe -> (merge_method, result) from a report written by ``markdown``."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].endswith(".yml"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows
