#!/usr/bin/env python
"""GPU benchmark: nbmerge with ``device="cuda"``, as effective GB/s against the card's own bandwidth.

One prepared run for a lent GPU machine (a few minutes of its time; the device tool's README says how such a
machine is lent). It measures, in order, and prints one table each:
  1. ceilings: the card's nominal memory bandwidth (2 · memory clock · bus width, from its properties), a
     device-to-device copy (bytes read + written / time), and host-to-device / device-to-host copies from pinned
     and from pageable memory (what a merge streaming from the page cache can get across the bus at best).
  2. agreement: every merge of ``speed.py``'s rows on a small Llama set (bfloat16 and float32 files), on the CPU
     (the C kernels) and on CUDA (the methods' torch code), in memory. Each output tensor is compared element
     by element in units in the last place of its dtype (the distance between the two values' bit patterns);
     the arithmetic is float32 on both devices but sums in another order, so a few ulps are rounding, not error.
  3. kernels: each method's per-tensor kernel on CUDA tensors of the large set's largest shape (the embedding,
     32000 × 2048), built as the engine builds a CUDA job (inputs converted to float32 on the device), timed with
     CUDA events; effective GB/s = the bytes the kernel must move at least (every input read once in float32,
     the output written once) / its time, and that as a fraction of the measured device copy.
  4. end to end: every row of ``speed.py`` on its large set (TinyLlama shapes, 14 layers, bfloat16, base + 3
     fine-tunes, 1.5 GB each), files to files, warm page cache, ``device="cuda"`` and ``device="cpu"`` (the
     machine's own cores), best of ``--repeat``: seconds, GB/s of input, and the peak GPU memory.

Usage:
  python benchmarks/gpu.py --json out/gpu.json         # on a machine with CUDA
  python benchmarks/gpu.py --device cpu --quick        # the same code on the CPU, small sizes: checks the script
On a lent machine (its image has torch; nbmerge is installed there without dependencies):
  python3 -m pip install -q --no-deps --no-build-isolation -e . && \
      PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --json $OUT/gpu.json | tee $OUT/gpu.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (the rows, sets and warm-cache helpers of the CPU benchmark)

GB = 1e9
COPY_BYTES = 2 * 2**30  # per copy measurement: many times the H200's 60 MB of L2
KERNEL_SHAPE = (32000, 2048)  # the large set's embedding and head, its largest tensors
QUICK_KERNEL_SHAPE = (1024, 1024)
AGREEMENT_SHAPE = dict(layers=2, hidden=256, intermediate=688, vocab=2048, heads=8, kv_heads=4)
MAX_ULPS = 4  # beyond this many units in the last place a CUDA/CPU difference is reported as disagreement


# -- timing ------------------------------------------------------------------------------------------------------
def timed(function, device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``function()`` over ``repeat`` calls after ``warmup`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            stop.record()
            stop.synchronize()
            seconds.append(start.elapsed_time(stop) / 1e3)
        else:
            began = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


# -- 1. ceilings -------------------------------------------------------------------------------------------------
def nominal_bandwidth() -> float | None:
    """2 · memory clock · bus width in bytes/s, from CuPy's or NVML's view of device 0; None if neither tells."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        return 2.0 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8
    except Exception:  # noqa: BLE001 - CuPy absent or too old: try NVML
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        return 2.0 * clock_mhz * 1e6 * pynvml.nvmlDeviceGetMemoryBusWidth(handle) / 8
    except Exception:  # noqa: BLE001
        return None


def ceilings(device: torch.device, nbytes: int) -> dict:
    """GB/s of the copies a merge is made of (device copy counted as read + write)."""
    measured = {"nominal device bandwidth": nominal_bandwidth() if device.type == "cuda" else None}
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    measured["device copy"] = 2 * nbytes / timed(lambda: target.copy_(source), device, 5)
    if device.type == "cuda":
        for label, pinned in (("pinned", True), ("pageable", False)):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
            measured[f"host to device, {label}"] = nbytes / timed(lambda: source.copy_(host, non_blocking=pinned),
                                                                   device, 3)
            measured[f"device to host, {label}"] = nbytes / timed(lambda: host.copy_(source, non_blocking=pinned),
                                                                   device, 3)
            del host
    del source, target
    return {name: None if value is None else value / GB for name, value in measured.items()}


# -- 2. agreement ------------------------------------------------------------------------------------------------
def ulp_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Units in the last place between same-dtype floats: the distance of their bit patterns on a line that
    orders them (a negative value's pattern p maps to -(p + 2^(bits-1)), so -0 and +0 meet at 0), so 1 means
    adjacent representable values."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[first.dtype]
    top = 1 << (torch.iinfo(bits).bits - 1)

    def ordered(tensor):
        pattern = tensor.contiguous().view(bits).to(torch.int64)
        return torch.where(pattern < 0, -(pattern + top), pattern)

    return (ordered(first) - ordered(second)).abs()


def agreement(device: torch.device, workdir: Path) -> list[dict]:
    """Each row merged in memory on the CPU and on ``device``: the worst ulp distance and how many differ."""
    import nbmerge
    from nbmerge.workbench.models.synthetic_llama import LlamaShape, build_llama_set

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        built = build_llama_set(workdir / f"agreement-{str(dtype).removeprefix('torch.')}",
                                LlamaShape(**AGREEMENT_SHAPE), n_models=3, dtype=dtype, seed=1)
        data = {"base": str(built.base), "models": [str(m) for m in built.models]}
        for row, (_, (method, params), kind) in speed.METHODS.items():
            base, models, _ = speed.merge_inputs(data, kind, speed.TABLE_MODELS)
            merged = {where: nbmerge.merge(method, models, base=base, device=where, progress=False, **params)
                      for where in ("cpu", str(device))}
            worst, differing, total = 0, 0, 0
            for name, on_cpu in merged["cpu"].state_dict.items():
                distance = ulp_distance(on_cpu, merged[str(device)].state_dict[name])
                worst = max(worst, int(distance.max()))
                differing += int(torch.count_nonzero(distance))
                total += distance.numel()
            rows.append({"row": row, "dtype": str(dtype).removeprefix("torch."), "max_ulps": worst,
                         "differing": differing / total, "agrees": worst <= MAX_ULPS})
    return rows


# -- 3. kernels --------------------------------------------------------------------------------------------------
def kernel_job(method, params: dict, kind: str, shape: tuple[int, int], device: torch.device):
    """A TensorJob as the engine builds it on ``device``: the row's inputs (bfloat16 values, base ~ N(0, 0.02²),
    fine-tunes + N(0, 0.002²)) converted to float32 there, parameters validated and schedules resolved."""
    from nbmerge.method.declaration import TensorJob
    from nbmerge.method.params import schedule_value
    from nbmerge_plugins import _selection
    from nbmerge_plugins.arithmetic import ties

    generator = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    n_models = 1 if kind == "base+1" else speed.TABLE_MODELS
    tunes = [(base.float() + 0.002 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
             for _ in range(n_models)]
    with_base = kind != "models"
    on_device = [t.to(device).float() for t in ([base] if with_base else []) + tunes]
    checked = method.validate(params, n_models, with_base)
    for param in method.params:
        if param.kind == "schedule":
            checked[param.name] = schedule_value(checked[param.name], "model.embed_tokens.weight", None, 14)
    job = TensorJob(name="model.embed_tokens.weight", models=on_device[with_base:],
                    base=on_device[0] if with_base else None, params=checked, layer=None, num_layers=14,
                    out_dtype=torch.bfloat16)
    if method.name == "ties" and checked["trim_scope"] == "model":  # the stage's result, for this tensor alone
        job.stage_results[ties.GLOBAL_THRESHOLD] = {"thresholds": _selection.tensor_thresholds(job, checked["density"]),
                                                    "majority_sign": 1.0}
    return job


def kernels(device: torch.device, shape: tuple[int, int], repeat: int, copy_gbs: float) -> list[dict]:
    """Each row's per-tensor kernel on ``device``: median seconds and effective GB/s."""
    from nbmerge.plugins import get_method

    rows = []
    for row, (_, (method_name, params), kind) in speed.METHODS.items():
        method = get_method(method_name)
        job = kernel_job(method, params, kind, shape, device)
        seconds = timed(lambda: method.merge_tensor(job), device, repeat)
        inputs = len(job.models) + (job.base is not None)
        moved = job.models[0].numel() * (4 * inputs + 2)  # each input read in float32, the output in bfloat16
        rows.append({"row": row, "inputs": inputs, "seconds": seconds, "gbs": moved / seconds / GB,
                     "of_copy": moved / seconds / GB / copy_gbs})
        del job
    return rows


# -- 4. end to end -----------------------------------------------------------------------------------------------
def end_to_end(devices: list[str], workdir: Path, set_name: str, repeat: int) -> list[dict]:
    """Every row, file to file on ``set_name``, warm page cache, per device: best seconds of ``repeat``."""
    import nbmerge

    data = speed.build_sets(workdir, [set_name])[set_name]
    every_input = speed.input_files([data["base"]] + data["models"][:speed.TABLE_MODELS])
    speed.read_into_page_cache(every_input)  # all rows' inputs stay cached: outputs bypass the page cache
    rows = []
    for row, (_, (method, params), kind) in speed.METHODS.items():
        base, models, inputs = speed.merge_inputs(data, kind, speed.TABLE_MODELS)
        input_bytes = sum(f.stat().st_size for f in speed.input_files(inputs))
        for where in devices:
            reports = []
            for _ in range(repeat):
                with tempfile.TemporaryDirectory(prefix="gpu-", dir=workdir) as out:
                    reports.append(nbmerge.merge(method, models, base=base, out=Path(out) / "merged", device=where,
                                                 progress=False, shard_size=data["shard_size"], **params).report)
            runs = [r.seconds for r in reports]
            peak = None if reports[0].peak_device_bytes is None else max(r.peak_device_bytes for r in reports)
            best = min(runs)
            rows.append({"row": row, "device": where, "seconds": best, "runs": runs, "input_bytes": input_bytes,
                         "gbs": input_bytes / best / GB, "peak_device_gib": None if peak is None else peak / 2**30})
            speed.log(f"  {row:20s} {where:5s} {best:6.2f} s ({input_bytes / best / GB:.2f} GB/s of input)")
    return rows


# -- report ------------------------------------------------------------------------------------------------------
def report(results: dict) -> str:
    lines = [f"nbmerge {results['commit']} on {results['device_name']} (torch {results['torch']}); "
             f"host: {results['machine']}", "", "ceilings (GB/s):"]
    lines += [f"  {name:28s} {'-' if value is None else f'{value:8.1f}'}" for name, value in results["ceilings"].items()]
    lines += ["", f"agreement, CPU vs {results['device']} (ulps of the output dtype; > {MAX_ULPS} is a disagreement):"]
    lines.append(speed.render(["method", "dtype", "max ulps", "differing", "verdict"],
                              [[r["row"], r["dtype"], str(r["max_ulps"]), f"{100 * r['differing']:.3f}%",
                                "agree" if r["agrees"] else "DISAGREE"] for r in results["agreement"]], {0, 1}))
    lines += ["", f"kernels on {results['device']}, one {results['kernel_shape'][0]}x{results['kernel_shape'][1]} "
                  f"tensor per input (float32 in, bfloat16 out; median of {results['repeat_kernels']}):"]
    lines.append(speed.render(["method", "inputs", "ms", "GB/s", "of device copy"],
                              [[r["row"], str(r["inputs"]), f"{1e3 * r['seconds']:.2f}", f"{r['gbs']:.1f}",
                                f"{100 * r['of_copy']:.0f}%"] for r in results["kernels"]], {0}))
    if results["end_to_end"]:
        lines += ["", f"end to end, {results['set']} set, files to files, warm page cache (best of "
                      f"{results['repeat']}):"]
        lines.append(speed.render(["method", "device", "seconds", "GB/s of input", "peak GPU GiB"],
                                  [[r["row"], r["device"], f"{r['seconds']:.2f}", f"{r['gbs']:.2f}",
                                    "-" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.2f}"]
                                   for r in results["end_to_end"]], {0, 1}))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    parser.add_argument("--quick", action="store_true", help="small copies and kernels, the small set end to end")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip section 4 (and building the large set)")
    parser.add_argument("--repeat", type=int, default=2, help="end-to-end runs per row and device (default 2)")
    parser.add_argument("--workdir", type=Path, default=speed.DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, help="save every measurement here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device here; --device cpu checks the script on the CPU")
    args.workdir.mkdir(parents=True, exist_ok=True)
    from peak_memory import git_commit

    shape = QUICK_KERNEL_SHAPE if args.quick else KERNEL_SHAPE
    results = {"commit": git_commit(), "machine": speed.machine(), "torch": torch.__version__,
               "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "the CPU", "kernel_shape": shape, "repeat": args.repeat, "repeat_kernels": 10,
               "set": "small" if args.quick else "large"}
    speed.log("ceilings")
    results["ceilings"] = ceilings(device, COPY_BYTES // 64 if args.quick else COPY_BYTES)
    speed.log("agreement")
    with tempfile.TemporaryDirectory(prefix="gpu-agreement-", dir=args.workdir) as scratch:
        results["agreement"] = agreement(device, Path(scratch))
    speed.log("kernels")
    results["kernels"] = kernels(device, shape, results["repeat_kernels"], results["ceilings"]["device copy"])
    results["end_to_end"] = []
    if not args.no_end_to_end:
        speed.log("end to end")
        devices = [str(device), "cpu"] if device.type == "cuda" else ["cpu"]
        results["end_to_end"] = end_to_end(devices, args.workdir, results["set"], max(1, args.repeat))
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["agrees"] for r in results["agreement"]) else 1


if __name__ == "__main__":
    sys.exit(main())
