"""Tune the decode-sized batched-LoRA launch per linear shape on this GPU; write the table
lora_delta reads (tandem/kernels/lora/tuned/<device>.json) and a result with every timing.

For each of a model's four linear groups and each step size in TOKENS (8 adapters of rank
16, tokens round-robin over them, bfloat16), every candidate is checked against the torch
reference and timed in a CUDA graph over weight copies past the L2 cache (bench/
lora_kernels.py's graph_time): the fused kernel over its tiling (K step, column groups,
warps, pipeline stages) and the two-launch path over its K split. The table keeps the
fastest per (group, step size); a step of T tokens takes the entry of the smallest tuned
size >= T, and steps past the largest keep the untuned choice. Each winner must also
compile for the largest rank tile (128), so a rank-128 adapter cannot fail at run time.

    PYTHONPATH=. python bench/lora_tune.py --model llama-8b     # on a GPU host
    TRITON_INTERPRET=1 .venv/bin/python bench/lora_tune.py --model smollm2 --smoke   # CPU check of the code path
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.lora_kernels import MODELS, RANK, copies_past_l2, graph_time, layer_groups, lora_bytes  # noqa: E402
from bench.report import machine_info, write_result  # noqa: E402
from tandem.kernels.lora import LoRABatch, LoRAWeights, reference  # noqa: E402
from tandem.kernels.lora.triton_sgmv import DecodeConfig, config_entry, shape_key, tuned_table_path  # noqa: E402

TOKENS = (1, 8, 16, 32, 64)
ADAPTERS = 8
DEFAULT = DecodeConfig(fused=True)  # the untuned launch: fused_delta's defaults
# The first H200 run (25 candidates) found the two-launch path 2-7x faster than any fused
# tiling at every size up to 64 tokens, its K split at the top of the range tried (16): the
# splits go further now, with the expand's column tile and the warps of both kernels. Shared
# memory per fused pipeline stage at the largest rank tile is (16 + 128) * block_k * 2 bytes.
CANDIDATES = [DEFAULT] + [
    DecodeConfig(True, block_k, groups, 4, 2) for block_k, groups in itertools.product((128, 256), (16, 64))
] + [
    DecodeConfig(False, num_warps=warps, split_k=k, block_n=block_n)
    for k, block_n, warps in itertools.product((8, 16, 32, 64), (64, 128), (2, 4))
]


def make_weights(in_features: int, out_slices: tuple[int, ...], rank: int, dtype, device) -> LoRAWeights:
    num_slices = len(out_slices)
    a = torch.randn(ADAPTERS, num_slices * rank, in_features, dtype=dtype, device=device) / in_features**0.5
    b = torch.randn(ADAPTERS, sum(out_slices), rank, dtype=dtype, device=device) / rank
    return LoRAWeights(a, b, torch.full((ADAPTERS,), rank, dtype=torch.int32, device=device), out_slices)


def seconds(config: DecodeConfig, sets, x, batch) -> float:
    """Per call: in a CUDA graph over the weight sets on CUDA; one timed call on CPU (smoke)."""
    calls = [lambda w=w, y=y: config.run(x, w, batch, y) for w, y in sets]
    if x.is_cuda:
        return graph_time(calls)
    start = time.perf_counter()
    calls[0]()
    return time.perf_counter() - start


def correct(config: DecodeConfig, w: LoRAWeights, x, batch) -> bool:
    """The config's delta (in the serving dtype, the kernel that is timed) within bf16
    rounding of the float32 reference on the same values."""
    y = torch.zeros(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    config.run(x, w, batch, y)
    expected = torch.zeros(y.shape, dtype=torch.float32, device=x.device)
    reference.lora_delta(x.float(), LoRAWeights(w.a.float(), w.b.float(), w.slot_ranks, w.out_slices), batch, expected)
    return ((y.float() - expected).norm() / expected.norm()).item() < 2e-2


def compiles_at_top_rank(config: DecodeConfig, in_features, out_slices, dtype, device) -> bool:
    """The config launches with the largest rank tile (shared memory and registers fit)."""
    w = make_weights(in_features, out_slices, 128, dtype, device)
    x = torch.randn(1, in_features, dtype=dtype, device=device)
    y = torch.zeros(1, w.out_features, dtype=dtype, device=device)
    try:
        config.run(x, w, LoRABatch.build([0], ADAPTERS, device=device), y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # triton's OutOfResources and compile errors alike
        print(f"  rejected {config}: {type(exc).__name__}: {str(exc)[:120]}")
        return False
    return True


def tune_group(name, in_features, out_slices, dtype, device, peak_gb_s, candidates, tokens):
    torch.manual_seed(0)
    w = make_weights(in_features, out_slices, RANK, dtype, device)
    copies = copies_past_l2(w.a.nbytes + w.b.nbytes, device) if device.type == "cuda" else 1
    rows, best = [], []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, in_features, dtype=dtype, device=device)
        batch = LoRABatch.build([t % ADAPTERS for t in range(num_tokens)], ADAPTERS, device=device)
        sets = [(LoRAWeights(torch.randn_like(w.a), torch.randn_like(w.b), w.slot_ranks, w.out_slices),
                 torch.zeros(num_tokens, w.out_features, dtype=dtype, device=device)) for _ in range(copies)]
        nbytes = lora_bytes(x, w, batch, sets[0][1])
        timed = []
        for config in candidates:
            if not correct(config, w, x, batch):
                print(f"  {name} T={num_tokens}: {config} does not match the reference; skipped")
                continue
            timed.append((seconds(config, sets, x, batch), config))
        timed.sort(key=lambda item: item[0])
        default_s = next(s for s, c in timed if c == DEFAULT)
        winner = next(((s, c) for s, c in timed if compiles_at_top_rank(c, in_features, out_slices, dtype, device)), None)
        row = {"group": name, "tokens": num_tokens, "lora_bytes": nbytes, "default_us": default_s * 1e6,
               "default_gb_s": nbytes / default_s / 1e9,
               "timings_us": [{"us": s * 1e6, **config_entry(c, num_tokens)} for s, c in timed]}
        if winner is not None:
            s, c = winner
            row |= {"best_us": s * 1e6, "best_gb_s": nbytes / s / 1e9, "best_of_copy_bandwidth": nbytes / s / 1e9 / peak_gb_s,
                    "best": config_entry(c, num_tokens), "speedup_over_default": default_s / s}
            best.append(config_entry(c, num_tokens))
        rows.append(row)
        print(f"{name:>8} {num_tokens:>4} {row['default_us']:>10.1f} {row.get('best_us', float('nan')):>9.1f} "
              f"{row.get('speedup_over_default', float('nan')):>7.2f}x {row.get('best_gb_s', float('nan')):>8.1f} "
              f"{row.get('best_of_copy_bandwidth', float('nan')):>6.2f}  {row.get('best')}")
    return rows, best


def write_table(device, dtype, model: str, tables: dict[str, list[dict]]) -> Path:
    """Merge this run's shapes into the device's table (other shapes are kept)."""
    path = tuned_table_path(device)
    table = json.loads(path.read_text()) if path.is_file() else {"configs": {}}
    table["configs"].update(tables)
    table |= {"device": torch.cuda.get_device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "adapters": ADAPTERS, "rank": RANK, "written_by": "bench/lora_tune.py", "machine": machine_info()}
    table.setdefault("models", {})[model] = sorted(tables)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-8b", choices=sorted(MODELS))
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter: two candidates, two step sizes; writes nothing")
    args = parser.parse_args()
    from bench.lora_kernels import copy_bandwidth

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    candidates = [DEFAULT, CANDIDATES[-1]] if args.smoke else CANDIDATES
    tokens = (1, 8) if args.smoke else TOKENS
    peak_gb_s = copy_bandwidth(device) / 1e9
    print(f"{len(candidates)} candidates; copy bandwidth {peak_gb_s:.0f} GB/s")
    print(f"{'group':>8} {'T':>4} {'default_us':>10} {'best_us':>9} {'speedup':>8} {'GB/s':>8} {'of_bw':>6}  best")
    rows, tables = [], {}
    for name, (in_features, out_slices) in layer_groups(args.model).items():
        group_rows, best = tune_group(name, in_features, out_slices, dtype, device, peak_gb_s, candidates, tokens)
        rows += group_rows
        tables[shape_key(in_features, out_slices)] = best
    if args.smoke:
        return
    print(f"wrote {write_table(device, dtype, args.model, tables)}")
    write_result(f"lora_tune_cuda_{args.model}", {
        "benchmark": "lora_tune", "machine": machine_info(), "model": args.model, "dtype": str(dtype).removeprefix("torch."),
        "adapters": ADAPTERS, "rank": RANK, "copy_bandwidth_gb_s": peak_gb_s, "candidates": len(candidates),
        "timing": "per call, median of 10 replays of a CUDA graph over weight copies past 3x the L2 cache",
        "rows": rows,
    })


if __name__ == "__main__":
    main()
