"""Batched-LoRA shrink+expand vs a loop over adapters and vs the base GEMM of the same layer.

SmolLM2-135M shapes (hidden 576, q 576 / kv 192, intermediate 1536), Llama-3.2-1B's (--model
llama-1b) or Llama-8B's (--model llama-8b), 8 adapters of rank 16 (--adapters), tokens spread round-robin over the adapters.
Runs on CPU (the C kernel, kernels/lora/native_cpu.py, on weights in the CPU slot pool's
layout, as serving calls it; the torch reference beside it) and, when CUDA is present, on the
GPU (Triton kernels; there also replayed in CUDA graphs over weights past the L2 cache, as a
decode step meets them). Achieved bandwidth: the least bytes lora_delta must
move (each active slot's A and B at its rank, x, y read and written) over its time, against
a large copy's bandwidth on the same device.

    python bench/lora_kernels.py            # writes bench/results/lora_kernels_<device>.json
    PYTHONPATH=. python bench/lora_kernels.py --model llama-8b --adapters 64   # on a GPU host
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from tandem.kernels.lora import LoRABatch, LoRAWeights, lora_delta, native_cpu  # noqa: E402
from tandem.server.adapters.slot_pool import b_pool  # noqa: E402

# Hidden, q, kv and intermediate widths of the models the kernels serve.
# llama-1b and llama-8b as bench/lora_serving.py's random models.
MODELS = {"smollm2": (576, 576, 192, 1536), "llama-1b": (2048, 2048, 512, 8192), "llama-8b": (4096, 4096, 1024, 14336)}
RANK = 16
TOKENS = (1, 8, 32, 128)


def layer_groups(model: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (in_features, output slices) of one decoder layer's fused linears."""
    hidden, q, kv, inter = MODELS[model]
    return {"qkv": (hidden, (q, kv, kv)), "o": (q, (hidden,)), "gate_up": (hidden, (inter, inter)), "down": (inter, (hidden,))}


def make_lora(num_adapters, in_features, out_slices, dtype, device) -> LoRAWeights:
    """Random slots, B in the layout the slot pool keeps on this device (on CPU the one the C
    kernel takes)."""
    num_slices, n_out = len(out_slices), sum(out_slices)
    a = torch.randn(num_adapters, num_slices * RANK, in_features, dtype=dtype, device=device) / in_features**0.5
    b = b_pool(num_adapters, n_out, RANK, dtype, device)
    b.copy_(torch.randn(num_adapters, n_out, RANK, dtype=dtype, device=device) / RANK)
    ranks = torch.full((num_adapters,), RANK, dtype=torch.int32, device=device)
    return LoRAWeights(a, b, ranks, out_slices)


def make_base(in_features, out_slices, dtype, device) -> torch.Tensor:
    return torch.randn(sum(out_slices), in_features, dtype=dtype, device=device) / in_features**0.5


def copies_past_l2(nbytes: int, device) -> int:
    """How many copies of an input set of nbytes together exceed three times the L2 cache, so
    that a graph cycling through them reads each from device memory, as a decode step does."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, -(-3 * l2 // nbytes))


def graph_time(calls) -> float:
    """Seconds per call on CUDA: one CUDA graph replays every call once (no launch gaps from
    Python); the median of 10 replays timed with events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def launch_floor_us() -> float:
    """What one kernel costs in a graph whatever its work: a 1-element fill, 200 of them in one
    graph, per fill. A decode-sized LoRA call is a few such launches on little data, so its
    floor is its launches times this plus its bytes at copy bandwidth, not its bytes alone."""
    t = torch.zeros(1, device="cuda")
    return graph_time([lambda: t.fill_(1.0)] * 200) * 1e6


def kernels_per_call(call) -> int:
    """Kernels (and memsets) one call launches, from torch's profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


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


def run(device, dtypes, peak_gb_s, groups, num_adapters, floor_us):
    rows = []
    # (group, tokens) -> kernels per call: the same launches in every dtype, so profiled once.
    launches: dict[tuple[str, int], int] = {}
    for dtype in dtypes:
        for name, (in_features, out_slices) in groups.items():
            torch.manual_seed(0)
            w, base = make_lora(num_adapters, in_features, out_slices, dtype, device), make_base(in_features, out_slices, dtype, device)
            for num_tokens in TOKENS:
                x = torch.randn(num_tokens, in_features, dtype=dtype, device=device)
                y = torch.zeros(num_tokens, w.out_features, dtype=dtype, device=device)
                slots = [t % num_adapters for t in range(num_tokens)]
                batch = LoRABatch.build(slots, num_adapters, device=device)
                token_slots = batch.token_slots
                if device.type == "cpu" and native_cpu.library() is not None and not native_cpu.applies(x, w, batch, y):
                    raise SystemExit(f"the C kernel does not take the {name} call: 'lora_delta' would time the torch path")
                fns = {
                    "base_gemm_us": lambda: F.linear(x, base),
                    "lora_delta_us": lambda: lora_delta(x, w, batch, y),
                    "naive_loop_us": lambda: naive_delta(x, w, token_slots, y),
                    "batch_build_us": lambda: LoRABatch.build(slots, num_adapters, device=device),
                }
                if device.type == "cpu" and dtype != torch.float32:
                    b32 = b_pool(num_adapters, w.out_features, RANK, torch.float32, device)
                    b32.copy_(w.b)
                    w32 = LoRAWeights(w.a.float(), b32, w.slot_ranks, w.out_slices)
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
                if device.type == "cuda":
                    row.update(graphed(w, base, x, batch, device))
                    times["lora_delta_us"], times["base_gemm_us"] = row["graph_lora_delta_us"] / 1e6, row["graph_base_gemm_us"] / 1e6
                row["lora_over_base"] = times["lora_delta_us"] / times["base_gemm_us"]
                row["lora_bytes"] = lora_bytes(x, w, batch, y)
                row["lora_gb_s"] = row["lora_bytes"] / times["lora_delta_us"] / 1e9
                row["of_copy_bandwidth"] = row["lora_gb_s"] / peak_gb_s
                if device.type == "cuda":
                    if (name, num_tokens) not in launches:
                        launches[name, num_tokens] = kernels_per_call(lambda: lora_delta(x, w, batch, y))
                    row["launches"] = launches[name, num_tokens]
                    row["floor_us"] = row["launches"] * floor_us + row["lora_bytes"] / peak_gb_s / 1e3
                    row["of_floor"] = row["floor_us"] / row["graph_lora_delta_us"]
                row["naive_over_lora"] = times["naive_loop_us"] / times["lora_delta_us"]
                rows.append(row)
    return rows


def graphed(w: LoRAWeights, base: torch.Tensor, x: torch.Tensor, batch: LoRABatch, device) -> dict:
    """lora_delta and the base GEMM timed in CUDA graphs over fresh copies of their weights
    (together past the L2 cache): what a decode step sees, without Python's launch cost."""
    lora_sets = [(LoRAWeights(torch.randn_like(w.a), torch.randn_like(w.b), w.slot_ranks, w.out_slices), torch.zeros(x.shape[0], w.out_features, dtype=x.dtype, device=device))
                 for _ in range(copies_past_l2(w.a.nbytes + w.b.nbytes, device))]
    bases = [torch.randn_like(base) for _ in range(copies_past_l2(base.nbytes, device))]
    lora_s = graph_time([lambda w=w_i, y=y_i: lora_delta(x, w, batch, y) for w_i, y_i in lora_sets])
    base_s = graph_time([lambda b=b: F.linear(x, b) for b in bases])
    return {"graph_lora_delta_us": lora_s * 1e6, "graph_base_gemm_us": base_s * 1e6, "graph_weight_copies": len(lora_sets)}


# Optional columns: printed when a row has them (CPU bf16 rows, CUDA rows).
EXTRA_COLUMNS = {"lora_delta_fp32_pool_us": "f32pool_us", "graph_lora_delta_us": "g_lora_us", "graph_base_gemm_us": "g_base_us", "triton_two_launch_us": "2launch_us",
                 "torch_reference_us": "torch_us", "lora_gb_s": "lora_GB/s", "of_copy_bandwidth": "of_copy_bw",
                 "launches": "launches", "floor_us": "floor_us", "of_floor": "of_floor"}


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
        + "".join(f" {r[key]:>11.{2 if key in ('of_copy_bandwidth', 'of_floor') else 1}f}" if key in r else f" {'-':>11}" for key in extra),
    )


def summarise(rows, peak_gb_s):
    """Per decoder layer (all four groups): each timing summed, for each dtype and token count.
    Ratios and bandwidth use the graph-replayed times where there are some (CUDA)."""
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for num_tokens in TOKENS:
            sel = [r for r in rows if r["dtype"] == dtype and r["tokens"] == num_tokens]
            keys = [k for k in sel[0] if k.endswith("_us") and all(k in r for r in sel)]
            layer = {"dtype": dtype, "tokens": num_tokens}
            layer.update({k: sum(r[k] for r in sel) for k in keys})
            lora, base = (("graph_lora_delta_us", "graph_base_gemm_us") if "graph_lora_delta_us" in layer
                          else ("lora_delta_us", "base_gemm_us"))
            layer["lora_over_base"] = layer[lora] / layer[base]
            layer["naive_over_lora"] = layer["naive_loop_us"] / layer[lora]
            layer["lora_bytes"] = sum(r["lora_bytes"] for r in sel)
            layer["lora_gb_s"] = layer["lora_bytes"] / layer[lora] / 1e3
            layer["of_copy_bandwidth"] = layer["lora_gb_s"] / peak_gb_s
            if all("floor_us" in r for r in sel):
                layer["launches"] = sum(r["launches"] for r in sel)
                layer["of_floor"] = layer["floor_us"] / layer[lora]
            out.append(layer)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS), help="whose layer shapes")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters, tokens spread round-robin over them")
    args = parser.parse_args()
    groups = layer_groups(args.model)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_at_start = os.getloadavg()[0]
    if device.type == "cpu" and load_at_start > 0.5:
        print(f"warning: load average {load_at_start:.2f}; other processes skew CPU timings")
    dtypes = (torch.bfloat16, torch.float32) if device.type == "cpu" else (torch.bfloat16, torch.float16)
    peak_gb_s = copy_bandwidth(device) / 1e9
    print(f"copy bandwidth (read + write) on {device.type}: {peak_gb_s:.1f} GB/s")
    floor_us = launch_floor_us() if device.type == "cuda" else None
    if floor_us is not None:
        print(f"one launch in a graph (a 1-element fill): {floor_us:.2f} us")
    rows = run(device, dtypes, peak_gb_s, groups, args.adapters, floor_us)
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
            "model": args.model,
            "adapters": args.adapters,
            "rank": RANK,
            "groups": {k: {"in": i, "out_slices": list(o)} for k, (i, o) in groups.items()},
            "token_assignment": "round-robin over the adapters",
            "lora_delta_fp32_pool_us": "bf16 activations with the slot pool stored in float32",
            "lora_gb_s": "the least bytes lora_delta must move (active slots' A and B at their rank, x, y read and "
            "written) over its time; of_copy_bandwidth: that over copy_bandwidth_gb_s, a 1 GiB (CUDA) or 256 MiB (CPU) "
            "copy on the same device. CPU timings are fastest calls, so the weights may sit in cache.",
            "timing": "CPU: fastest of up to 300 interleaved single calls; CUDA: best of 10 rounds of 50 calls from "
            "Python, and (graph_*) the median of 10 replays of a CUDA graph that runs the call once on each of "
            "graph_weight_copies fresh weight sets (together over 3x the L2 cache), per call; CUDA ratios and "
            "bandwidth use the graph times. lora_delta adds into a preallocated y",
            "floor_us": "CUDA: the call's kernel launches (launches, counted by torch's profiler) x launch_floor_us (one "
            "1-element fill in a graph of 200) + lora_bytes at copy bandwidth: what the call could take at best in "
            "those launches; of_floor: floor_us over graph_lora_delta_us",
        },
        "copy_bandwidth_gb_s": peak_gb_s,
        "launch_floor_us": floor_us,
        "rows": rows,
        "per_layer": per_layer,
    }
    suffix = ("" if args.model == "smollm2" else f"_{args.model}") + ("" if args.adapters == 8 else f"_{args.adapters}_adapters")
    kind = f"cpu_{cpu_kind()}" if device.type == "cpu" else device.type
    write_result(f"lora_kernels_{kind}{suffix}", result)


if __name__ == "__main__":
    main()
