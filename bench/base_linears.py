"""The base model's linears in isolation: F.linear, weights prepacked once for oneDNN, and the
skinny C kernel for a decode's few rows (bfloat16 on AVX512-BF16, float32 on AVX2).

A decode step on CPU is mostly the base GEMMs. `F.linear` in bfloat16 hands the weight to
oneDNN in its plain layout on every call, and oneDNN reorders it into the blocked layout its
kernels read; weights reordered once at load skip that. This measures both (and MKL's
packed float32 GEMM, whose packing is tied to one row count) per SmolLM2-135M shape, dtype
and row count, so the engine's choice rests on numbers; beside each, the weight bytes per second against this
run's copy bandwidth (read + write), the floor of a call whose time is its weight. Each call reads a different copy of
the weight, about 256 MB of them in turn, as a decode step reads each layer's weight once:
one weight called in a loop stays in cache and measures a speed the engine never sees.

    .venv/bin/python bench/base_linears.py [--quick] [--dtypes float32 bfloat16]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from bench.lora_kernels import copy_bandwidth  # noqa: E402
from tandem.kernels import row_buckets, skinny_linear  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query / 3 kv heads of 64; vocabulary 49152.
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
METHODS = ("F.linear", "prepacked", "skinny", "mkl packed (rows fixed)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STREAM_BYTES = 256 << 20


def best_times(methods: dict[str, list], x: torch.Tensor, rounds: int = 7) -> dict[str, float]:
    """Seconds per call for each method: the best of `rounds` passes over its calls (one per
    weight copy), the methods' passes interleaved so a busy moment hits them alike."""
    best = dict.fromkeys(methods, float("inf"))
    for calls in methods.values():
        for fn in calls:
            fn(x)
    for _ in range(rounds):
        for name, calls in methods.items():
            t = time.perf_counter()
            for fn in calls:
                fn(x)
            best[name] = min(best[name], (time.perf_counter() - t) / len(calls))
    return best


def methods(weights: list[torch.Tensor], rows: int) -> dict:
    """name -> one callable(x) per weight copy; only the methods this CPU and dtype support."""
    w0 = weights[0]
    out = {"F.linear": [lambda x, w=w: row_buckets.linear(x, w) for w in weights]}
    if torch.backends.mkldnn.is_available() and (w0.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
        out["prepacked"] = [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
    if rows <= skinny_linear.MAX_ROWS.get(w0.dtype, 0) and skinny_linear.pack(w0) is not None:
        skinny = [skinny_linear.pack(w) for w in weights]
        out["skinny"] = [lambda x, p=p: skinny_linear.linear(x, p, w0.shape[0]) for p in skinny]
    if w0.dtype == torch.float32 and hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear"):
        mkl = [(torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w) for w in weights]
        out["mkl packed (rows fixed)"] = [lambda x, m=m, w=w: torch.ops.mkl._mkl_linear(x, m, w, None, rows) for m, w in mkl]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="rows 1, 32, 256 only")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="default: all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_list = (1, 32, 256) if args.quick else ROWS
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(torch.device("cpu"))
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    table = []
    print(f"{'shape':8} {'dtype':9} {'rows':>5} " + "  ".join(f"{m:>24}" for m in METHODS) + "  speedup  skinny  GB/s (prepacked, skinny)")
    with torch.inference_mode():
        for dname, dtype in ((d, DTYPES[d]) for d in args.dtypes):
            for sname, (n, k) in SHAPES.items():
                copies = max(1, STREAM_BYTES // (n * k * dtype.itemsize))
                weights = [(torch.randn(n, k) * 0.05).to(dtype) for _ in range(copies)]
                for rows in rows_list:
                    x = torch.randn(rows, k).to(dtype)
                    times = best_times(methods(weights, rows), x)
                    row = {"shape": sname, "out_features": n, "in_features": k, "dtype": dname, "rows": rows, "weight_copies": copies}
                    row["ms"] = {name: 1e3 * t for name, t in times.items()}
                    row["prepacked_speedup"] = row["ms"]["F.linear"] / row["ms"].get("prepacked", row["ms"]["F.linear"])
                    weight_bytes = n * k * dtype.itemsize
                    row["weight_gb_per_s"] = {name: weight_bytes / t / 1e9 for name, t in times.items()}
                    if "skinny" in times and "prepacked" in times:
                        row["skinny_vs_prepacked"] = times["prepacked"] / times["skinny"]
                    table.append(row)
                    cells = "  ".join(f"{row['ms'][m]:>21.3f} ms" if m in row["ms"] else f"{'-':>24}" for m in METHODS)
                    skinny = f"{row['skinny_vs_prepacked']:5.2f}x" if "skinny_vs_prepacked" in row else f"{'-':>6}"
                    rates = ", ".join(f"{row['weight_gb_per_s'][m]:.1f}" for m in ("prepacked", "skinny") if m in times)
                    print(f"{sname:8} {dname:9} {rows:5d} {cells}  {row['prepacked_speedup']:5.2f}x  {skinny}  {rates}", flush=True)
    result = {"machine": machine_info(), "threads": args.threads, "copy_gb_per_s": bandwidth / 1e9, "table": table}
    write_result(f"base_linears_cpu_{cpu_kind()}" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
