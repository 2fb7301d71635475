"""Batched-LoRA shrink+expand vs a loop over adapters and vs the base GEMM of the same layer.

SmolLM2-135M shapes (hidden 576, q 576 / kv 192, intermediate 1536), 8 adapters of rank 16,
tokens spread round-robin over the adapters. Runs on CPU (the torch reference, which is
the CPU serving path) and, when CUDA is present, on the GPU (Triton kernels). Achieved
bandwidth: the least bytes lora_delta must move (each active slot's A and B at its rank,
x, y read and written) over its time, against a large copy's bandwidth on the same device.

    python bench/lora_kernels.py            # writes bench/results/lora_kernels_<device>.json
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import machine_info, write_result  # noqa: E402
from tandem.kernels.lora import LoRABatch, LoRAWeights, lora_delta  # noqa: E402

HIDDEN, Q, KV, INTER = 576, 576, 192, 1536
# name -> (in_features, output slices)
GROUPS = {
    "qkv": (HIDDEN, (Q, KV, KV)),
    "o": (Q, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTER, INTER)),
    "down": (INTER, (HIDDEN,)),
}
NUM_ADAPTERS, RANK = 8, 16
TOKENS = (1, 8, 32, 128)


def make_layer(in_features, out_slices, dtype, device):
    num_slices, n_out = len(out_slices), sum(out_slices)
    a = torch.randn(NUM_ADAPTERS, num_slices * RANK, in_features, dtype=dtype, device=device) / in_features**0.5
    b = torch.randn(NUM_ADAPTERS, n_out, RANK, dtype=dtype, device=device) / RANK
    ranks = torch.full((NUM_ADAPTERS,), RANK, dtype=torch.int32, device=device)
    base = torch.randn(n_out, in_features, dtype=dtype, device=device) / in_features**0.5
    return LoRAWeights(a, b, ranks, out_slices), base


def naive_delta(x, w, token_slots, y):
    """What a straightforward port does: per adapter a boolean mask, per slice two matmuls."""
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        idx = (token_slots == slot).nonzero().squeeze(1)
        xs = x[idx]
        start = 0
        for s, width in enumerate(w.out_slices):
            a_s = w.a[slot, s * RANK : (s + 1) * RANK]
            b_s = w.b[slot, start : start + width]
            y[idx, start : start + width] += (xs @ a_s.t()) @ b_s.t()
            start += width


def lora_bytes(x, w, batch, y) -> int:
    """The least memory lora_delta must move: each active slot's A and B at its rank, x once,
    and y read and written for the tokens with an adapter."""
    item = w.a.element_size()
    weights = sum(
        (w.num_slices * w.in_features + w.out_features) * w.host_ranks[seg.slot] * item for seg in batch.segments
    )
    n = batch.num_lora_tokens
    return weights + n * w.in_features * x.element_size() + 2 * n * w.out_features * y.element_size()


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write): the practical peak."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = min(timeit([lambda: dst.copy_(src)], device, calls=10, budget=5.0))
    return 2 * src.numel() * src.element_size() / seconds


def timeit(fns, device, calls=300, budget=1.0):
    """Seconds per call of each function, the functions taking turns.

    CPU: the fastest of up to `calls` single calls (at least 3; fewer once `budget` seconds
    are spent).
    The machine is shared with other jobs and torch's two threads stall whenever one is
    descheduled, so the fastest call is the one estimate that other load does not move.
    CUDA: the best of 10 rounds of 50 calls, synchronised at the end of each round.
    """
    for fn in fns:
        fn()
        fn()
    if device.type == "cuda":
        best = [float("inf")] * len(fns)
        for _ in range(10):
            for i, fn in enumerate(fns):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
                best[i] = min(best[i], (time.perf_counter() - t0) / 50)
        return best
    best = [float("inf")] * len(fns)
    start = time.perf_counter()
    for call in range(calls):
        if call >= 3 and time.perf_counter() - start > budget:
            break
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run(device, dtypes, peak_gb_s):
    rows = []
    for dtype in dtypes:
        for name, (in_features, out_slices) in GROUPS.items():
            torch.manual_seed(0)
            w, base = make_layer(in_features, out_slices, dtype, device)
            for num_tokens in TOKENS:
                x = torch.randn(num_tokens, in_features, dtype=dtype, device=device)
                y = torch.zeros(num_tokens, w.out_features, dtype=dtype, device=device)
                slots = [t % NUM_ADAPTERS for t in range(num_tokens)]
                batch = LoRABatch.build(slots, NUM_ADAPTERS, device=device)
                token_slots = batch.token_slots
                fns = {
                    "base_gemm_us": lambda: F.linear(x, base),
                    "lora_delta_us": lambda: lora_delta(x, w, batch, y),
                    "naive_loop_us": lambda: naive_delta(x, w, token_slots, y),
                    "batch_build_us": lambda: LoRABatch.build(slots, NUM_ADAPTERS, device=device),
                }
                if device.type == "cpu" and dtype != torch.float32:
                    w32 = LoRAWeights(w.a.float(), w.b.float(), w.slot_ranks, w.out_slices)
                    fns["lora_delta_fp32_pool_us"] = lambda: lora_delta(x, w32, batch, y)
                if device.type == "cuda":
                    from tandem.kernels.lora import triton_sgmv

                    fns["triton_two_launch_us"] = lambda: triton_sgmv.lora_expand(
                        triton_sgmv.lora_shrink(x, w, batch), w, batch, y
                    )
                    fns["torch_reference_us"] = lambda: lora_delta(x, w, batch, y, backend="torch")
                times = dict(zip(fns, timeit(list(fns.values()), device)))
                row = {"dtype": str(dtype).removeprefix("torch."), "group": name, "tokens": num_tokens}
                row.update({key: t * 1e6 for key, t in times.items()})
                row["lora_over_base"] = times["lora_delta_us"] / times["base_gemm_us"]
                row["lora_bytes"] = lora_bytes(x, w, batch, y)
                row["lora_gb_s"] = row["lora_bytes"] / times["lora_delta_us"] / 1e9
                row["of_copy_bandwidth"] = row["lora_gb_s"] / peak_gb_s
                row["naive_over_lora"] = times["naive_loop_us"] / times["lora_delta_us"]
                rows.append(row)
    return rows


# Optional columns: printed when a row has them (CPU bf16 rows, CUDA rows).
EXTRA_COLUMNS = {"lora_delta_fp32_pool_us": "f32pool_us", "triton_two_launch_us": "2launch_us",
                 "torch_reference_us": "torch_us", "lora_gb_s": "lora_GB/s", "of_copy_bandwidth": "of_copy_bw"}


def print_header(rows):
    extra = [label for key, label in EXTRA_COLUMNS.items() if any(key in r for r in rows)]
    print(f"{'dtype':>8} {'group':>7} {'T':>4} {'base_us':>9} {'lora_us':>9} {'naive_us':>9} "
          f"{'lora/base':>9} {'naive/lora':>10}" + "".join(f" {label:>11}" for label in extra))


def print_row(r, rows):
    extra = [key for key in EXTRA_COLUMNS if any(key in other for other in rows)]
    print(
        f"{r['dtype']:>8} {r['group']:>7} {r['tokens']:>4} "
        f"{r['base_gemm_us']:>9.1f} {r['lora_delta_us']:>9.1f} {r['naive_loop_us']:>9.1f} "
        f"{r['lora_over_base']:>9.2f} {r['naive_over_lora']:>10.2f}"
        + "".join(f" {r[key]:>11.{2 if key == 'of_copy_bandwidth' else 1}f}" if key in r else f" {'-':>11}" for key in extra),
    )


def summarise(rows, peak_gb_s):
    """Per decoder layer (all four groups): each timing summed, for each dtype and token count."""
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for num_tokens in TOKENS:
            sel = [r for r in rows if r["dtype"] == dtype and r["tokens"] == num_tokens]
            keys = [k for k in sel[0] if k.endswith("_us") and all(k in r for r in sel)]
            layer = {"dtype": dtype, "tokens": num_tokens}
            layer.update({k: sum(r[k] for r in sel) for k in keys})
            layer["lora_over_base"] = layer["lora_delta_us"] / layer["base_gemm_us"]
            layer["naive_over_lora"] = layer["naive_loop_us"] / layer["lora_delta_us"]
            layer["lora_bytes"] = sum(r["lora_bytes"] for r in sel)
            layer["lora_gb_s"] = layer["lora_bytes"] / layer["lora_delta_us"] / 1e3
            layer["of_copy_bandwidth"] = layer["lora_gb_s"] / peak_gb_s
            out.append(layer)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_at_start = os.getloadavg()[0]
    if device.type == "cpu" and load_at_start > 0.5:
        print(f"warning: load average {load_at_start:.2f}; other processes skew CPU timings")
    dtypes = (torch.bfloat16, torch.float32) if device.type == "cpu" else (torch.bfloat16, torch.float16)
    peak_gb_s = copy_bandwidth(device) / 1e9
    print(f"copy bandwidth (read + write) on {device.type}: {peak_gb_s:.1f} GB/s")
    rows = run(device, dtypes, peak_gb_s)
    per_layer = summarise(rows, peak_gb_s)
    print_header(rows)
    for r in rows:
        print_row(r, rows)
    print("\nper decoder layer (qkv + o + gate_up + down):")
    for r in per_layer:
        print_row(dict(r, group="layer"), per_layer)
    result = {
        "benchmark": "lora_kernels",
        "device": device.type,
        "machine": machine_info(),
        "load_average_1m_at_start": load_at_start,
        "setup": {
            "adapters": NUM_ADAPTERS,
            "rank": RANK,
            "groups": {k: {"in": i, "out_slices": list(o)} for k, (i, o) in GROUPS.items()},
            "token_assignment": "round-robin over the adapters",
            "lora_delta_fp32_pool_us": "bf16 activations with the slot pool stored in float32",
            "lora_gb_s": "the least bytes lora_delta must move (active slots' A and B at their rank, x, y read and "
            "written) over its time; of_copy_bandwidth: that over copy_bandwidth_gb_s, a 1 GiB (CUDA) or 256 MiB (CPU) "
            "copy on the same device. CPU timings are fastest calls, so the weights may sit in cache.",
            "timing": "CPU: fastest of up to 300 interleaved single calls; CUDA: best of 10 rounds of 50; "
            "lora_delta adds into a preallocated y",
        },
        "copy_bandwidth_gb_s": peak_gb_s,
        "rows": rows,
        "per_layer": per_layer,
    }
    write_result(f"lora_kernels_{device.type}", result)


if __name__ == "__main__":
    main()
