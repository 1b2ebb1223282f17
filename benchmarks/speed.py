#!/usr/bin/env python
"""Speed benchmark: nbmerge against mergekit 0.1.5 and against the I/O floor, warm and cold page cache.

What it does, in one run:
  1. Builds Llama-architecture checkpoint sets (base + fine-tunes, no downloads) with the same builder as
     ``peak_memory.py``: "large" (TinyLlama-1.1B shapes, 14 layers, ~1.5 GB per model in bf16, sharded in 500 MB
     files) and "small" (hidden 1024, 4 layers, ~0.25 GB per model in fp32, one model.safetensors per model).
  2. Creates the benchmark's own environment for mergekit (``benchmarks/out/mergekit-venv``: torch==2.13.0, then
     mergekit==0.1.5 from PyPI) on first use, so mergekit runs as it would for a user, in its own interpreter.
  3. Runs each merge (linear, task_arithmetic, ties, dare_ties, slerp) with each tool, best of 3 (see REPEAT),
     every run in a fresh subprocess: nbmerge (this venv), mergekit (its venv, ``run_merge`` with mergekit's
     default options), and the I/O floor (plain ``safetensors``: read every input tensor the merge reads, write
     the output's bytes, no arithmetic; the targets' floor, as the issue defines it) and the direct floor (the
     same reads, the output written with O_DIRECT like nbmerge's: on a VM whose page-cache writes cost seconds of
     CPU, the disk's own floor; shown beside the targets, not one). A subprocess records its import time, its
     merge time and its whole-life peak RSS (VmHWM, read in the process itself, so a fresh address space: the
     parent's memory never counts).
     Warm: the inputs are dropped from the page cache and read once with read() before the run, so every run
     starts from the cache a copy or a download leaves, whatever ran before. Cold:
     ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every input file before the run (per file, so other users of the machine keep their page cache; /proc/sys/vm/drop_caches
     is not used). ``sync`` runs before every measured run, so no write-back of an earlier output overlaps it.
  4. Prints one table: seconds, peak RSS, and the ratios mergekit / nbmerge (merge time, import excluded on both
     sides) and nbmerge / floor, with each target. ``--scaling`` adds the scaling run (nbmerge alone): time and
     peak RSS of task_arithmetic and ties as the model doubles in layers (4, 8, 16) and as the number of
     models grows (2, 4, 8).
  5. ``--singular`` runs only the singular-vector methods (tsv_m, iso_c, iso_cts at their FusionBench defaults)
     beside TIES (the table's per-tensor row) on the small set, nbmerge alone, warm cache: seconds per GB of
     input and the ratio to TIES. These decompose every matrix (T + 2, 1 and T + 3 thin SVDs), so their cost is
     arithmetic where TIES's is reading the files.

Like-for-like semantics (mergekit name -> nbmerge call):
  linear          -> weighted_average (equal weights, normalised)
  task_arithmetic -> task_arithmetic (λ = 1)
  ties            -> ties, trim_scope="tensor", sign="sum", merge_func="mean" (mergekit's normalize=True), density 0.2
  dare_ties       -> dare, combine="ties", rescale="l1" (mergekit's L1 rescaling), drop_rate 0.5 (density 0.5)
  slerp           -> slerp between the base and one fine-tune, t = 0.5
  nbmerge's default TIES (trim_scope="model", one global threshold per task vector) is timed too; mergekit has
  no counterpart, so that row is compared with the same run of mergekit's per-tensor TIES.

Usage (with the project's venv):
  python benchmarks/speed.py                     # the README table: both sets, warm and cold, + scaling
  python benchmarks/speed.py --sets small --cache warm --no-mergekit   # a quick look while developing
  python benchmarks/speed.py --json benchmarks/out/speed.json
  python benchmarks/speed.py --singular          # tsv_m, iso_c, iso_cts against ties, small set
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "out"
MIB, GIB = 1024**2, 1024**3
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"

# name -> (peak_memory-style config, layers, dtype, fine-tunes built)
SETS = {
    "large": (dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                   vocab_size=32000, shard_size=500 * 10**6), 14, "bfloat16", 3),
    # 8 fine-tunes so that the scaling run's 2, 4 and 8 models come from one set (the table uses the first 3)
    "small": (dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                   vocab_size=8000, shard_size=100 * 10**9), 4, "float32", 8),
}
TABLE_MODELS = 3
# Each tool's run is repeated up to ``--repeat`` times while its runs total less than REPEAT_BUDGET seconds, and
# the fastest counts (with the largest peak RSS of the runs). On a VM, memory the guest frees goes back to the host
# within seconds and costs ~1.5 s per GB to touch again, so one run of a series can take 2-3x the next whatever
# the tool: with a single run, ratios near a target line are a coin toss.
TOOLS = ("nbmerge", "mergekit", "floor", "direct floor")
WITHOUT_MERGEKIT = tuple(t for t in TOOLS if t != "mergekit")
REPEAT, REPEAT_BUDGET = 3, 60.0  # the tools take turns run by run (nbmerge, mergekit, floor, nbmerge, ...)

# method row -> (mergekit config builder, nbmerge method and params, which inputs: "models", "base+models",
# "base+1"); ``None`` for mergekit where it has no counterpart of its own.
METHODS = {
    "linear": ("linear", ("weighted_average", {"normalize": True}), "models"),
    "task_arithmetic": ("task_arithmetic", ("task_arithmetic", {"scaling": 1.0}), "base+models"),
    "ties": ("ties", ("ties", {"trim_scope": "tensor", "density": 0.2, "sign": "sum", "merge_func": "mean",
                                "scaling": 1.0}), "base+models"),
    "dare_ties": ("dare_ties", ("dare", {"combine": "ties", "drop_rate": 0.5, "rescale": "l1", "scaling": 1.0,
                                         "seed": 0}), "base+models"),
    "slerp": ("slerp", ("slerp", {"t": 0.5}), "base+1"),
    "ties (model scope)": ("ties", ("ties", {"trim_scope": "model", "density": 0.2, "sign": "sum",
                                             "merge_func": "mean", "scaling": 1.0}), "base+models"),
}
# the singular-vector methods, timed against the "ties" row by ``--singular`` (no mergekit counterpart, no targets)
SINGULAR = {name: (None, (name, {}), "base+models") for name in ("tsv_m", "iso_c", "iso_cts")}
TARGETS = {"linear": (5, 1.5), "task_arithmetic": (5, 1.5), "slerp": (5, 1.5), "ties": (20, 3.0),
           "dare_ties": (5, 3.0), "ties (model scope)": (20, 3.0)}


def mergekit_config(name: str, base: str, models: list[str], dtype: str) -> dict:
    weighted = [{"model": m, "parameters": {"weight": 1.0}} for m in models]
    if name == "linear":
        return {"merge_method": "linear", "parameters": {"normalize": True}, "models": weighted, "dtype": dtype}
    if name == "task_arithmetic":
        return {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 1.0},
                "models": weighted, "dtype": dtype}
    if name == "ties":
        return {"merge_method": "ties", "base_model": base, "parameters": {"normalize": True, "lambda": 1.0},
                "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in models],
                "dtype": dtype}
    if name == "dare_ties":
        return {"merge_method": "dare_ties", "base_model": base, "parameters": {"lambda": 1.0},
                "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
                "dtype": dtype}
    if name == "slerp":
        return {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
                "models": [{"model": base}, {"model": models[0]}], "dtype": dtype}
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------------------------
# The measured child processes (stdlib at module level: the mergekit venv runs this file too)
# ---------------------------------------------------------------------------------------------------------------
def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    tool = spec["tool"]
    if tool == "nbmerge":
        import nbmerge

        nbmerge.methods()  # plugins loaded: part of the import cost, not of the merge
        imported, cpu_at_import = time.perf_counter(), _cpu_seconds()
        method, params = spec["nbmerge"]
        nbmerge.merge(method, spec["models"], base=spec["base"], out=spec["out"], progress=False,
                      shard_size=spec["shard_size"], **params)
    elif tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        imported, cpu_at_import = time.perf_counter(), _cpu_seconds()
        options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                               random_seed=0)
        run_merge(MergeConfiguration.model_validate(spec["mergekit"]), spec["out"], options=options)
    elif tool in ("floor", "direct floor"):
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        imported, cpu_at_import = time.perf_counter(), _cpu_seconds()
        write = save_file if tool == "floor" else functools.partial(save_direct, torch=torch)
        copy_io_floor(spec["inputs"], spec["out"], safe_open, write, torch)
    else:
        raise ValueError(tool)
    finished = time.perf_counter()
    Path(spec["result"]).write_text(json.dumps({
        "import_seconds": imported - started, "seconds": finished - imported, "peak_rss": _vm_hwm(),
        "cpu_seconds": _cpu_seconds() - cpu_at_import, "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}))


def copy_io_floor(inputs: list[str], out: str, safe_open, save_file, torch) -> None:
    """Read every tensor of every input with plain safetensors, and write the first input's tensors to ``out``
    shard by shard (the output of a merge has the first input's layout): the bytes a merge must move, no math."""
    Path(out).mkdir(parents=True)
    landing = torch.empty(0, dtype=torch.uint8)  # one reused buffer: reading costs a copy, never a page fault
    for index, model in enumerate(inputs):
        for shard in sorted(Path(model).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            for tensor in tensors.values():  # safetensors maps the file lazily: copying out is what reads it
                raw = tensor.reshape(-1).view(torch.uint8)
                if raw.numel() > landing.numel():
                    landing = torch.empty(raw.numel(), dtype=torch.uint8)
                landing[:raw.numel()].copy_(raw)
            if index == 0:
                save_file(tensors, str(Path(out) / shard.name), metadata={"format": "pt"})
            del tensors


DIRECT_CHUNK = 64 * MIB  # the aligned staging buffer of the direct floor (O_DIRECT wants aligned memory and sizes)


def save_direct(tensors: dict, path: str, metadata: dict, torch) -> None:
    """The same safetensors file, written with O_DIRECT: the 8-byte header length and the JSON header, then each
    tensor's bytes, streamed through one page-aligned buffer; the last block is padded, then the file truncated
    to its length. The disk's own write speed, with no page-cache copy (nbmerge writes its outputs this way)."""
    import mmap

    dtype_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                   torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
    names = list(tensors)
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": dtype_names[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    pieces = [torch.frombuffer(bytearray(len(encoded).to_bytes(8, "little") + encoded), dtype=torch.uint8)]
    pieces += [tensors[name].reshape(-1).view(torch.uint8) for name in names]
    staging_map = mmap.mmap(-1, DIRECT_CHUNK)
    staging = torch.frombuffer(staging_map, dtype=torch.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        filled = 0
        for piece in pieces:
            done = 0
            while done < piece.numel():
                n = min(DIRECT_CHUNK - filled, piece.numel() - done)
                staging[filled:filled + n].copy_(piece[done:done + n])
                filled, done = filled + n, done + n
                if filled == DIRECT_CHUNK:
                    os.write(fd, staging_map)
                    filled = 0
        if filled:
            padded = -(-filled // 4096) * 4096
            os.write(fd, memoryview(staging_map)[:padded])
        os.ftruncate(fd, 8 + len(encoded) + offset)
    finally:
        os.close(fd)
        del staging
        staging_map.close()


# ---------------------------------------------------------------------------------------------------------------
# The parent: sets, environments, runs
# ---------------------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[speed] {message}", file=sys.stderr, flush=True)


def build_sets(workdir: Path, names: list[str]) -> dict:
    sys.path.insert(0, str(HERE))
    from peak_memory import build_set  # the one checkpoint-set builder of the benchmarks

    sets = {}
    for name in names:
        cfg, layers, dtype, finetunes = SETS[name]
        sets[name] = build_set(workdir, f"speed-{name}", cfg, layers, dtype, log, finetunes=finetunes)
        sets[name].update(name=name, dtype=dtype, shard_size=cfg["shard_size"])
    return sets


def mergekit_python(workdir: Path) -> Path:
    """The benchmark's own mergekit environment, created on first use (torch first: the CPU wheel, pinned)."""
    venv = workdir / "mergekit-venv"
    python = venv / "bin" / "python"
    stamp = venv / f".mergekit-{MERGEKIT_VERSION}-torch-{TORCH_VERSION}"
    if stamp.exists():
        return python
    log(f"creating {venv} (torch=={TORCH_VERSION}, mergekit=={MERGEKIT_VERSION} from PyPI)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    for requirement in (f"torch=={TORCH_VERSION}", f"mergekit=={MERGEKIT_VERSION}"):
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", requirement], check=True)
    stamp.touch()
    return python


def input_files(folders: list[str]) -> list[Path]:
    return [f for folder in folders for f in sorted(Path(folder).glob("*.safetensors"))]


def drop_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(files: list[Path]) -> None:
    """The warm state: every file dropped from the page cache, then read once with read(). How pages entered
    the cache decides what mapping them costs (read() leaves large folios; posix_fadvise(WILLNEED) or mmap faults
    under MADV_RANDOM leave 4 KiB pages, ~10x dearer to map and unmap), so a cache left by whichever tool ran
    before would favour one tool or the other."""
    drop_from_page_cache(files)
    buffer = bytearray(64 * MIB)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def run_one(tool: str, python: Path, spec: dict, workdir: Path, cache: str, inputs: list[str]) -> dict:
    files = input_files(inputs)
    with tempfile.TemporaryDirectory(prefix="speed-", dir=workdir) as tmp:
        tmp = Path(tmp)
        spec = {**spec, "tool": tool, "out": str(tmp / "merged"), "result": str(tmp / "result.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        os.sync()
        if cache == "cold":
            drop_from_page_cache(files)
        else:
            read_into_page_cache(files)
        started = time.perf_counter()
        proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--_child", str(tmp / "spec.json")],
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{tool} failed on {spec['label']} (exit {proc.returncode})")
        result = json.loads((tmp / "result.json").read_text())
        result["written"] = sum(f.stat().st_size for f in (tmp / "merged").rglob("*.safetensors"))
    result["wall"] = wall
    return result


def merge_inputs(data: dict, kind: str, n_models: int) -> tuple[str | None, list[str], list[str]]:
    """(base, models, every input folder read) for a method's input kind."""
    models = data["models"][:n_models]
    if kind == "models":
        return None, models, models
    if kind == "base+1":
        return data["base"], models[:1], [data["base"], models[0]]
    return data["base"], models, [data["base"]] + models


def run_method(row: str, data: dict, workdir: Path, cache: str, mergekit: Path | None, n_models: int,
               tools=TOOLS, repeat: int = REPEAT) -> dict:
    mergekit_name, (method, params), kind = {**METHODS, **SINGULAR}[row]
    base, models, inputs = merge_inputs(data, kind, n_models)
    spec = {"label": f"{row} on {data['name']} ({cache})", "models": models, "base": base,
            "nbmerge": [method, params], "shard_size": data["shard_size"],
            "mergekit": mergekit_config(mergekit_name, data["base"], models, data["dtype"]) if mergekit_name else None,
            "inputs": inputs}
    measured = {"row": row, "set": data["name"], "cache": cache, "n_models": n_models,
                "input_bytes": sum(f.stat().st_size for f in input_files(inputs))}
    pythons = {tool: mergekit if tool == "mergekit" else Path(sys.executable) for tool in TOOLS}
    runs = {tool: [] for tool in tools if not (tool == "mergekit" and mergekit is None)}

    def wants_more(tool_runs: list) -> bool:
        return not tool_runs or (len(tool_runs) < repeat and sum(r["seconds"] for r in tool_runs) < REPEAT_BUDGET)

    while any(wants_more(tool_runs) for tool_runs in runs.values()):
        for tool, tool_runs in runs.items():  # the tools take turns, so a slow stretch of the machine hits all
            if wants_more(tool_runs):
                tool_runs.append(run_one(tool, pythons[tool], spec, workdir, cache, inputs))
                log(f"  {tool:12s} {row:20s} {data['name']:5s} {cache}: {tool_runs[-1]['seconds']:7.2f} s "
                    f"(+{tool_runs[-1]['import_seconds']:.1f} s import), peak "
                    f"{tool_runs[-1]['peak_rss'] / MIB:6.0f} MiB")
    for tool, tool_runs in runs.items():
        measured[tool] = {**min(tool_runs, key=lambda r: r["seconds"]), "runs": [r["seconds"] for r in tool_runs],
                          "peak_rss": max(r["peak_rss"] for r in tool_runs)}
    return measured


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def render(header: list[str], rows: list[list[str]], left: set[int]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def direct_columns(r: dict) -> list[str]:
    """The direct floor's seconds and nbmerge's ratio to it (shown beside the targets' floor, not a target)."""
    direct = r.get("direct floor")
    if direct is None:
        return ["-", "-"]
    return [f"{direct['seconds']:.2f}", f"{r['nbmerge']['seconds'] / direct['seconds']:.2f}x"]


def ratio_table(results: list[dict]) -> tuple[str, list[str]]:
    header = ["set", "cache", "method", "nbmerge s", "mergekit s", "floor s", "mk/nb", "target",
              "nb/floor", "target", "direct floor s", "nb/direct", "nb RSS MiB", "mk RSS MiB", "mk e2e s", "nb e2e s"]
    rows, misses = [], []
    for r in results:
        nb, mk, floor = r["nbmerge"], r.get("mergekit"), r["floor"]
        speedup_target, floor_target = TARGETS[r["row"]]
        speedup = mk["seconds"] / nb["seconds"] if mk else None
        over_floor = nb["seconds"] / floor["seconds"]
        ok_speed = speedup is None or speedup >= speedup_target
        ok_floor = over_floor <= floor_target
        ok_rss = mk is None or nb["peak_rss"] < mk["peak_rss"]
        for ok, what in ((ok_speed, f"{speedup and round(speedup, 1)}x faster than mergekit (target "
                                    f"{speedup_target}x)"),
                         (ok_floor, f"{over_floor:.2f}x the I/O floor (target {floor_target}x)"),
                         (ok_rss, "peak RSS not below mergekit's")):
            if not ok:
                misses.append(f"{r['row']} on {r['set']} ({r['cache']}): {what}")
        rows.append([r["set"], r["cache"], r["row"], f"{nb['seconds']:.2f}", f"{mk['seconds']:.2f}" if mk else "-",
                     f"{floor['seconds']:.2f}", f"{speedup:.1f}x" if mk else "-",
                     f"{'>=' if ok_speed else 'MISS <'}{speedup_target}x",
                     f"{over_floor:.2f}x", f"{'<=' if ok_floor else 'MISS >'}{floor_target}x",
                     *direct_columns(r),
                     f"{nb['peak_rss'] / MIB:.0f}", f"{mk['peak_rss'] / MIB:.0f}" if mk else "-",
                     f"{mk['wall']:.1f}" if mk else "-", f"{nb['wall']:.1f}"])
    return render(header, rows, {0, 1, 2}), misses


def scaling_table(results: list[dict]) -> str:
    header = ["method", "set", "layers", "models", "input GiB", "nbmerge s", "GB/s read", "floor s", "nb/floor",
              "direct floor s", "nb/direct", "peak RSS MiB"]
    rows = [[r["row"], r["set"], str(r["layers"]), str(r["n_models"]), f"{r['input_bytes'] / GIB:.2f}",
             f"{r['nbmerge']['seconds']:.2f}", f"{r['input_bytes'] / r['nbmerge']['seconds'] / 1e9:.2f}",
             f"{r['floor']['seconds']:.2f}", f"{r['nbmerge']['seconds'] / r['floor']['seconds']:.2f}x",
             *direct_columns(r), f"{r['nbmerge']['peak_rss'] / MIB:.0f}"] for r in results]
    return render(header, rows, {0, 1})


def singular_table(results: list[dict]) -> str:
    """Seconds per GB of input (base + fine-tunes) and the ratio to the TIES row's."""
    ties = next(r for r in results if r["row"] == "ties")
    per_gb = {r["row"]: r["nbmerge"]["seconds"] / (r["input_bytes"] / 1e9) for r in results}
    header = ["method", "input GB", "nbmerge s", "s per GB", "x ties", "peak RSS MiB"]
    rows = [[r["row"], f"{r['input_bytes'] / 1e9:.2f}", f"{r['nbmerge']['seconds']:.2f}", f"{per_gb[r['row']]:.2f}",
             f"{per_gb[r['row']] / per_gb[ties['row']]:.1f}x", f"{r['nbmerge']['peak_rss'] / MIB:.0f}"]
            for r in results]
    return render(header, rows, {0})


def run_singular(args) -> int:
    """``--singular``: the singular-vector methods beside TIES, small set, warm cache, nbmerge only."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = build_sets(args.workdir, ["small"])["small"]
    results = [run_method(row, data, args.workdir, "warm", None, TABLE_MODELS, tools=("nbmerge",),
                          repeat=max(1, args.repeat)) for row in ("ties", *SINGULAR)]
    from peak_memory import git_commit

    print(f"nbmerge {git_commit()} on {machine()}, torch threads as the engine sets them")
    print(f"  small: {data['layers']} layers, {data['dtype']}, {data['model_bytes'] / 1e9:.2f} GB per model, base + "
          f"{TABLE_MODELS} fine-tunes; seconds: the merge in its own process, imports excluded, the fastest of up to "
          f"{max(1, args.repeat)} runs (fewer once they took {REPEAT_BUDGET:.0f} s); ties: the table's per-tensor row")
    print(singular_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "commit": git_commit(), "singular": results},
                                        indent=1) + "\n")
    return 0


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{os.cpu_count()} CPUs ({cpu}), {memory:.1f} GiB RAM, Linux {platform.release()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="large,small", help=f"comma-separated from {', '.join(SETS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {', '.join(METHODS)}")
    parser.add_argument("--cache", default="warm,cold", help="warm, cold or both (default warm,cold)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit (nbmerge and the floor only)")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the scaling run (default on)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeat", type=int, default=REPEAT,
                        help=f"runs per tool and row, the fastest counts (default {REPEAT}; fewer once the runs "
                             f"took {REPEAT_BUDGET:.0f} s)")
    parser.add_argument("--json", type=Path, help="save every measurement here")
    parser.add_argument("--singular", action="store_true",
                        help="only tsv_m, iso_c and iso_cts against ties, small set, warm cache, nbmerge alone")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    if args.singular:
        return run_singular(args)

    set_names = [s for s in args.sets.split(",") if s]
    rows = [m.strip() for m in args.methods.split(",") if m.strip()]
    caches = [c for c in args.cache.split(",") if c]
    for given, known, what in ((set_names, SETS, "set"), (rows, METHODS, "method"), (caches, ("warm", "cold"), "cache")):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    mergekit = None if args.no_mergekit else mergekit_python(args.workdir)
    sets = build_sets(args.workdir, sorted(set(set_names) | ({"small"} if args.scaling else set())))

    sys.path.insert(0, str(HERE))
    from peak_memory import git_commit

    load_before = os.getloadavg()
    results = []
    for cache in caches:
        for set_name in set_names:
            measured = {}
            for row in rows:
                # mergekit has one TIES (per tensor): the model-scope row is compared with that same measurement
                shared = METHODS[row][0] if row != METHODS[row][0] and METHODS[row][0] in measured else None
                tools = WITHOUT_MERGEKIT if shared else TOOLS
                measured[row] = run_method(row, sets[set_name], args.workdir, cache, mergekit, TABLE_MODELS, tools,
                                           max(1, args.repeat))
                if shared and "mergekit" in measured[shared]:
                    measured[row]["mergekit"] = measured[shared]["mergekit"]
                results.append(measured[row])

    scaling = []
    if args.scaling:
        log("scaling run: layers 4, 8, 16 (3 models) and models 2, 4, 8 (4 layers), warm cache")
        cfg, layers, dtype, finetunes = SETS["small"]
        from peak_memory import build_set

        by_layers = {layers: sets["small"]}
        for more in (2 * layers, 4 * layers):
            by_layers[more] = build_set(args.workdir, "speed-small", cfg, more, dtype, log)
            by_layers[more].update(name="small", dtype=dtype, shard_size=cfg["shard_size"])
        for row in ("task_arithmetic", "ties"):
            for count, data in by_layers.items():
                scaling.append({**run_method(row, data, args.workdir, "warm", None, TABLE_MODELS,
                                             tools=WITHOUT_MERGEKIT, repeat=max(1, args.repeat)),
                                "layers": count})
            for n_models in (2, 4, 8):
                scaling.append({**run_method(row, sets["small"], args.workdir, "warm", None, n_models,
                                             tools=WITHOUT_MERGEKIT, repeat=max(1, args.repeat)),
                                "layers": layers})

    print(f"nbmerge {git_commit()} vs mergekit {MERGEKIT_VERSION} (torch {TORCH_VERSION}) on {machine()}")
    print(f"  load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine slows every column)")
    for name in set_names:
        data = sets[name]
        print(f"  {name}: {data['layers']} layers, {data['dtype']}, {data['model_bytes'] / 1e9:.2f} GB per model, "
              f"{'sharded' if SETS[name][0]['shard_size'] < data['model_bytes'] else 'single file'}, "
              f"base + {TABLE_MODELS} fine-tunes")
    print(f"  seconds: the merge in its own process, imports excluded, the fastest of up to {max(1, args.repeat)} runs "
          f"(fewer once they took {REPEAT_BUDGET:.0f} s); e2e: that whole process, imports included; RSS: the largest "
          f"peak of the runs")
    table, misses = ratio_table(results)
    print(table)
    if scaling:
        print("\nscaling (nbmerge, warm cache, small set):")
        print(scaling_table(scaling))
    print("\ntargets: " + ("all met" if not misses else f"{len(misses)} missed"))
    for miss in misses:
        print(f"  MISS {miss}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "commit": git_commit(), "results": results,
                                         "scaling": scaling}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
