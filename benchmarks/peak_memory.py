#!/usr/bin/env python
"""Peak-memory benchmark: does a merge's peak RSS follow the largest tensor rather than the model size?

Acceptance criterion: a 3-model merge of a ~1 GB-per-model Llama checkpoint set runs with peak memory set by the
largest tensor, not the model: doubling the number of layers leaves peak RSS within 10%.

What it does:
  1. Builds two Llama-architecture checkpoint sets (no downloads): L layers and 2L layers, each a base model and
     three fine-tunes (base + small seeded noise), as sharded safetensors with ``model.safetensors.index.json``
     and a ``config.json`` from ``transformers.LlamaConfig``. Tensors are generated one at a time and written a
     shard at a time, so the build never holds a whole model. Sets are cached under ``--workdir`` and reused.
  2. Runs every merge in a fresh Python subprocess and reads, inside it, the RSS after ``import nbmerge, torch``
     (and loading the method plugins): the baseline; and the peak RSS of the merge (VmHWM, which nbmerge resets
     when the merge starts). The parent also gets the child's whole-life ``ru_maxrss`` from ``os.wait4``.
     Each progress event (one per tensor per pass) records the current RSS, the high-water mark so far and
     glibc's ``mallinfo2`` counters, so the report can say which tensor the peak came with and whether RSS
     creeps up with the layers.
  3. Prints a table and, per method, peak(2L) / peak(L): PASS when <= 1.10. Exits 1 on any FAIL.

Usage:
  python benchmarks/peak_memory.py                 # ~1 GB bf16 models (8 and 16 layers), task_arithmetic + ties
  python benchmarks/peak_memory.py --quick         # ~50 MB models, a smoke run of a minute or so
  python benchmarks/peak_memory.py --methods task_arithmetic,ties,weighted_average --json out.json
  python benchmarks/peak_memory.py --env MALLOC_ARENA_MAX=2   # environment for the merge subprocesses

This is a standalone script (not a package); run it with the project's virtual environment.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "out"
MIB = 1024**2
GIB = 1024**3
LIMIT = 1.10
SET_FORMAT = 2  # bump when the generated sets change, so cached ones are rebuilt

# Llama configurations. "full": TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
# vocab 32000) at 8 layers, ~0.97 GiB in bf16; the largest tensors are the embedding and the head (125 MiB bf16).
CONFIGS = {
    "full": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, layers=8, shard_size=500 * 10**6),
    "quick": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4,
                  vocab_size=16000, layers=4, shard_size=20 * 10**6),
}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
METHODS = {
    "task_arithmetic": dict(base=True, params={}),
    "ties": dict(base=True, params={"trim_scope": "model"}),
    "weighted_average": dict(base=False, params={}),
}
N_FINETUNES = 3
BASE_STD, NOISE_STD = 0.02, 0.002


# ---------------------------------------------------------------------------------------------------------------
# Building checkpoint sets
# ---------------------------------------------------------------------------------------------------------------
def llama_shape(cfg: dict, layers: int):
    from nbmerge.workbench.models.synthetic_llama import LlamaShape

    return LlamaShape(layers=layers, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                      vocab=cfg["vocab_size"], heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"])


def llama_config(cfg: dict, layers: int, dtype: str):
    import transformers
    from transformers import LlamaConfig

    # The config key is "dtype" from transformers 5 on (where "torch_dtype" is a deprecated alias).
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return LlamaConfig(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                       num_hidden_layers=layers, num_attention_heads=cfg["num_attention_heads"],
                       num_key_value_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
                       tie_word_embeddings=False, **{dtype_key: dtype})


def check_layout_against_transformers(config, layout) -> None:
    """The generated names and shapes must be exactly those of a LlamaForCausalLM (built on the meta device)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = dict(layout)
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = [n for n in set(got) & set(expected) if got[n] != expected[n]][:5]
        raise SystemExit(f"generated layout differs from LlamaForCausalLM: missing {missing}, extra {extra}, "
                         f"wrong shapes {wrong}")


def set_spec(config_name: str, cfg: dict, layers: int, dtype: str, finetunes: int = N_FINETUNES) -> dict:
    return {"format": SET_FORMAT, "config": config_name, "layers": layers, "dtype": dtype,
            **{k: v for k, v in cfg.items() if k != "layers"}, "finetunes": finetunes,
            "base_std": BASE_STD, "noise_std": NOISE_STD}


def build_set(workdir: Path, config_name: str, cfg: dict, layers: int, dtype_name: str, log,
              finetunes: int = N_FINETUNES) -> dict:
    """Build (or reuse) base + fine-tunes for one layer count; returns {folder, base, models, sizes}.

    ``cfg["shard_size"]`` sets the shard size (a size above the model's gives one ``model.safetensors``)."""
    import torch

    from nbmerge.workbench.models.synthetic_llama import build_llama_set

    dtype = getattr(torch, dtype_name)
    spec = set_spec(config_name, cfg, layers, dtype_name, finetunes)
    suffix = "" if finetunes == N_FINETUNES else f"-{finetunes}ft"
    folder = workdir / f"llama-{config_name}-{layers}L-{dtype_name}{suffix}"
    names = ["base"] + [f"ft{i}" for i in range(finetunes)]
    layout = llama_shape(cfg, layers).tensors()
    itemsize = dtype.itemsize
    info = {"folder": str(folder), "base": str(folder / "base"),
            "models": [str(folder / n) for n in names[1:]], "layers": layers,
            "model_bytes": sum(math.prod(s) for _, s in layout) * itemsize,
            "largest_tensor": max(layout, key=lambda e: math.prod(e[1]))[0],
            "largest_tensor_bytes": max(math.prod(s) for _, s in layout) * itemsize}
    marker = folder / "set.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        log(f"reusing {folder}")
        return info
    need = info["model_bytes"] * len(names)
    free = shutil.disk_usage(workdir).free
    if need > free * 0.9:
        raise SystemExit(f"not enough disk under {workdir}: the set needs {need / GIB:.1f} GiB, "
                         f"{free / GIB:.1f} GiB free")
    shutil.rmtree(folder, ignore_errors=True)
    check_layout_against_transformers(llama_config(cfg, layers, dtype_name), layout)
    started = time.perf_counter()
    log(f"building {folder} ({len(names)} models x {info['model_bytes'] / GIB:.2f} GiB)")
    # nbmerge's own builder: tensor by tensor, base ~ N(0, 0.02^2) (norms ~ 1), fine-tunes = base + N(0, 0.002^2)
    built = build_llama_set(folder, llama_shape(cfg, layers), n_models=finetunes, dtype=dtype,
                            noise=NOISE_STD, shard_size=cfg["shard_size"])
    info.update(base=str(built.base), models=[str(m) for m in built.models])
    marker.write_text(json.dumps(spec, indent=2) + "\n")
    log(f"built {folder} in {time.perf_counter() - started:.0f} s")
    return info


# ---------------------------------------------------------------------------------------------------------------
# The measured child process
# ---------------------------------------------------------------------------------------------------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo():
    """glibc's heap counters (bytes): arena = sbrk/arena heap held, hblkhd = mmapped chunks, uordblks = in use,
    fordblks = free but held in the arenas. None where glibc's mallinfo2 is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return {name: int(getattr(info, name)) for name in ("arena", "hblkhd", "uordblks", "fordblks")}


def _status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                parts = rest.split()
                values[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return values


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    import torch  # noqa: F401

    import nbmerge

    nbmerge.methods()  # loads nbmerge.api and the method plugins, so the baseline holds every module the merge uses
    baseline = _status()
    import_seconds = time.perf_counter() - started
    trace = []
    have_mallinfo = _mallinfo() is not None

    def on_progress(event) -> None:
        status = _status()
        row = [event.phase, event.tensor, status["VmRSS"], status["VmHWM"], status["RssAnon"]]
        if have_mallinfo:
            info = _mallinfo()
            row += [info["arena"], info["hblkhd"], info["uordblks"], info["fordblks"]]
        trace.append(row)

    kwargs = dict(spec["params"])
    result = nbmerge.merge(spec["method"], spec["models"], base=spec["base"], out=spec["out"], progress=False,
                           on_progress=on_progress, shard_size=spec["shard_size"], **kwargs)
    after = _status()
    out = {
        "baseline_rss": baseline["VmRSS"], "import_hwm": baseline["VmHWM"], "import_seconds": import_seconds,
        "peak_rss": result.report.peak_rss_bytes, "vmhwm_after": after["VmHWM"], "rss_after": after["VmRSS"],
        "threads_after": after.get("Threads"), "mallinfo_after": _mallinfo(),
        "seconds": result.report.seconds, "bytes_read": result.report.bytes_read,
        "bytes_written": result.report.bytes_written, "tensors": result.report.tensors,
        "stages": result.report.stages,
        "trace_fields": ["phase", "tensor", "rss", "hwm", "rss_anon"]
                        + (["arena", "mmapped", "in_use", "free_in_arena"] if have_mallinfo else []),
        "trace": trace,
    }
    Path(spec["result"]).write_text(json.dumps(out))


def run_merge(method: str, data: dict, workdir: Path, shard_size: int, env_extra: dict, log) -> dict:
    """Run one merge in a fresh interpreter; return its measurements (the output folder is deleted after)."""
    setup = METHODS[method]
    with tempfile.TemporaryDirectory(prefix="peak-", dir=workdir) as tmp:
        tmp = Path(tmp)
        spec = {"method": method, "models": data["models"], "base": data["base"] if setup["base"] else None,
                "out": str(tmp / "merged"), "params": setup["params"], "shard_size": shard_size,
                "result": str(tmp / "result.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, **env_extra}
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", str(tmp / "spec.json")],
                                    stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.stderr.write((tmp / "stderr").read_text()[-4000:])
            raise SystemExit(f"{method} on {data['layers']} layers failed in its subprocess (exit {proc.returncode})")
        merged = tmp / "merged"
        written = sum(f.stat().st_size for f in merged.iterdir()) if merged.exists() else 0
        result = json.loads((tmp / "result.json").read_text())
    result.update(method=method, layers=data["layers"], model_bytes=data["model_bytes"],
                  largest_tensor=data["largest_tensor"], largest_tensor_bytes=data["largest_tensor_bytes"],
                  # Not the merge's peak: exec() folds the spawning (vforked) parent's RSS into the child's
                  # ru_maxrss, so this is at least the parent's RSS at spawn time. Kept for reference only.
                  child_ru_maxrss=usage.ru_maxrss * 1024, child_wall=wall, output_bytes_on_disk=written,
                  env=env_extra)
    result.update(analyse(result))
    return result


def analyse(result: dict) -> dict:
    """From the per-tensor trace: with which tensor the peak was reached, and how RSS moves across the layers."""
    fields = result["trace_fields"]
    rows = [dict(zip(fields, row)) for row in result["trace"]]
    peak = result["peak_rss"]
    # The high-water mark first within 2 MiB of the final peak: the peak came while producing that tensor (with
    # the next PREFETCH_DEPTH being read and the previous ones being written). None: after the last tensor.
    at = next((r for r in rows if r["hwm"] >= peak - 2 * MIB), None)
    merge_rows = [r for r in rows if r["phase"] == "merge" and r["tensor"]]
    layer_rows = [r for r in merge_rows if ".layers." in r["tensor"]]
    summary = {"peak_phase": at["phase"] if at else None, "peak_tensor": at["tensor"] if at else None}
    if layer_rows:
        half = len(layer_rows) // 2
        first, second = layer_rows[:half] or layer_rows, layer_rows[half:]
        summary.update(
            layer_rss_first_half_max=max(r["rss"] for r in first),
            layer_rss_second_half_max=max(r["rss"] for r in second),
            layer_rss_min=min(r["rss"] for r in layer_rows),
            layer_rss_max=max(r["rss"] for r in layer_rows),
        )
        if "arena" in fields:
            summary.update(layer_arena_max=max(r["arena"] for r in layer_rows),
                           layer_free_in_arena_max=max(r["free_in_arena"] for r in layer_rows))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    header = ["method", "layers", "model GiB", "largest MiB", "baseline MiB", "peak MiB", "peak-base MiB",
              "seconds", "peak reached at"]
    def where(r):
        if not r["peak_phase"]:
            return "after the last tensor"
        return f"{r['peak_phase']}: {r['peak_tensor'] or '(phase start)'}"

    rows = [[r["method"], str(r["layers"]), f"{r['model_bytes'] / GIB:.2f}", f"{r['largest_tensor_bytes'] / MIB:.0f}",
             f"{r['baseline_rss'] / MIB:.0f}", f"{r['peak_rss'] / MIB:.0f}",
             f"{(r['peak_rss'] - r['baseline_rss']) / MIB:.0f}", f"{r['seconds']:.1f}", where(r)] for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    left = {0, len(header) - 1}

    def fmt(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def verdicts(results: list[dict], small: int, large: int) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in results):
        by_layers = {r["layers"]: r for r in results if r["method"] == method}
        if small not in by_layers or large not in by_layers:
            continue
        a, b = by_layers[small], by_layers[large]
        ratio = b["peak_rss"] / a["peak_rss"]
        delta_ratio = (b["peak_rss"] - b["baseline_rss"]) / max(1, a["peak_rss"] - a["baseline_rss"])
        out.append({"method": method, "ratio": ratio, "delta_ratio": delta_ratio,
                    "verdict": "PASS" if ratio <= LIMIT else "FAIL"})
    return out


def git_commit() -> str:
    """The library's commit (with "+dirty" when its tracked files differ from it), for the record."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return head + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="base layer count L (the second set has 2L); "
                        "default 8 (4 with --quick)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="storage dtype (default bf16)")
    parser.add_argument("--quick", action="store_true", help="small models (~50 MB) for a fast smoke run")
    parser.add_argument("--methods", default="task_arithmetic,ties",
                        help=f"comma-separated, from {', '.join(METHODS)} (default task_arithmetic,ties)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="where checkpoint sets are built and cached, and merges written (default benchmarks/out)")
    parser.add_argument("--json", type=Path, help="save every measurement (with per-tensor traces) here")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the merge subprocesses (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0

    config_name = "quick" if args.quick else "full"
    cfg = CONFIGS[config_name]
    small = args.layers or cfg["layers"]
    large = 2 * small
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    env_extra = dict(item.split("=", 1) for item in args.env)
    dtype_name = DTYPES[args.dtype]
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[peak_memory] {message}", file=sys.stderr, flush=True)

    commit = git_commit()
    sets = {layers: build_set(args.workdir, config_name, cfg, layers, dtype_name, log) for layers in (small, large)}
    results = []
    for method in methods:
        for layers in (small, large):
            log(f"merging {method} on {layers} layers")
            result = run_merge(method, sets[layers], args.workdir, cfg["shard_size"], env_extra, log)
            log(f"  peak {result['peak_rss'] / MIB:.0f} MiB, baseline {result['baseline_rss'] / MIB:.0f} MiB, "
                f"{result['seconds']:.1f} s")
            results.append(result)

    print(f"nbmerge peak memory ({commit}): {config_name} config, {dtype_name}, {N_FINETUNES} fine-tunes "
          f"(+ base where the method uses one), layers {small} vs {large}"
          + (f", env {' '.join(args.env)}" if args.env else ""))
    print(table(results))
    print()
    checks = verdicts(results, small, large)
    for check in checks:
        print(f"{check['method']}: peak({large}L)/peak({small}L) = {check['ratio']:.3f} "
              f"(peak-baseline ratio {check['delta_ratio']:.3f}) -> {check['verdict']} (limit {LIMIT:.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config_name, "dtype": dtype_name, "layers": [small, large],
                                         "nbmerge_commit": commit,
                                         "env": env_extra, "results": results, "verdicts": checks}, indent=1) + "\n")
        print(f"\nsaved {args.json}")
    return 1 if any(c["verdict"] == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
