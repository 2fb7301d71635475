"""Decode attention on CPU: the C kernel (kernels/decode_attention_cpu.c) against the torch
path it replaces (each context gathered out of the paged cache, then SDPA), in one run.

1. Per call, SmolLM2's heads (9 query over 3 KV heads of 64), contexts in 16-slot blocks
   spread over a cache; each pass calls 30 layers' caches in turn, as a decode step does,
   so a call's keys and values are not in cache from the call before. Reports ms per call,
   the ratio and the bandwidth the kernel reaches over the K/V bytes it must read.
2. In the engine, SmolLM2 decode steps with 8 and 24 running sequences, the kernel switched
   on and off (TANDEM_NATIVE_ATTENTION) between interleaved rounds of steps, so a busy
   moment of a shared host hits both alike.

    .venv/bin/python bench/decode_attention.py [--quick]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from bench.toggled_steps import toggled_decode_steps  # noqa: E402
from tandem.kernels import decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16
CALL_SHAPES = ((1, 128), (8, 256), (24, 200), (32, 512), (64, 1024))
STEP_SEQUENCES = (8, 24)


def layer_caches(n: int, context: int, dtype: torch.dtype, seed: int) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAYERS (k, v) caches, each with room for twice the contexts, and n contexts of
    context/2 .. context tokens in blocks scattered over them."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(context // 2, context + 1, (n,), generator=g).to(torch.int32)
    width = int(lens.max())
    blocks_each = -(-width // BLOCK)
    num_slots = 2 * n * blocks_each * BLOCK + 1
    caches = [
        (torch.randn(num_slots, KV_HEADS, HEAD_DIM, generator=g).to(dtype), torch.randn(num_slots, KV_HEADS, HEAD_DIM, generator=g).to(dtype))
        for _ in range(LAYERS)
    ]
    blocks = torch.randperm(num_slots // BLOCK, generator=g)[: n * blocks_each].view(n, -1)
    slots = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK)).view(n, -1)[:, :width]
    valid = torch.arange(width)[None, :] < lens[:, None].long()
    slots = torch.where(valid, slots, num_slots - 1).contiguous()
    return caches, slots, lens, valid


def torch_path(q, k_cache, v_cache, slots, valid) -> torch.Tensor:
    """What attention.py does without the kernel."""
    n = q.shape[0]
    k = k_cache.index_select(0, slots.reshape(-1)).view(*slots.shape, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = v_cache.index_select(0, slots.reshape(-1)).view(*slots.shape, KV_HEADS, HEAD_DIM).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.view(n, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), k, v, attn_mask=valid.view(n, 1, 1, -1))
    return o.reshape(n, HEADS * HEAD_DIM)


def per_call(n: int, context: int, dtype: torch.dtype, rounds: int) -> dict:
    caches, slots, lens, valid = layer_caches(n, context, dtype, seed=n)
    q = torch.randn(n, HEADS, HEAD_DIM).to(dtype)
    methods = {
        "kernel": lambda k, v: decode_attention.decode_attention(q, k, v, slots, lens),
        "gather + sdpa": lambda k, v: torch_path(q, k, v, slots, valid),
    }
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(rounds):
        for name, fn in methods.items():
            started = time.perf_counter()
            for k, v in caches:
                fn(k, v)
            best[name] = min(best[name], (time.perf_counter() - started) / LAYERS)
    kv_bytes = 2 * int(lens.sum()) * KV_HEADS * HEAD_DIM * caches[0][0].element_size()
    return {
        "sequences": n, "context": context, "dtype": str(dtype).removeprefix("torch."),
        "kernel_ms": 1000 * best["kernel"], "torch_ms": 1000 * best["gather + sdpa"],
        "speedup": best["gather + sdpa"] / best["kernel"], "kernel_gb_per_s": kv_bytes / best["kernel"] / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shapes (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if decode_attention.library() is None:
        sys.exit("the C kernel is not built here (no compiler, or TANDEM_NATIVE_ATTENTION=0): nothing to compare")
    shapes = CALL_SHAPES[:2] if args.quick else CALL_SHAPES
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float32)
    calls = [per_call(n, ctx, dtype, rounds=2 if args.quick else 7) for dtype in dtypes for n, ctx in shapes]
    print(f"{'dtype':>8} {'seqs':>5} {'context':>8} {'kernel ms':>10} {'torch ms':>9} {'speedup':>8} {'kernel GB/s':>12}")
    for c in calls:
        print(f"{c['dtype']:>8} {c['sequences']:>5} {c['context']:>8} {c['kernel_ms']:>10.3f} {c['torch_ms']:>9.3f} {c['speedup']:>7.2f}x {c['kernel_gb_per_s']:>12.1f}")
    rounds, count = (2, 4) if args.quick else (6, 8)
    steps = [toggled_decode_steps(n, rounds, count, "TANDEM_NATIVE_ATTENTION", decode_attention.library.cache_clear) for n in STEP_SEQUENCES]
    print(f"\nSmolLM2 decode step ({steps[0]['dtype']}): sequences, kernel ms, torch ms, speedup")
    for s in steps:
        print(f"{s['sequences']:>5} {s['kernel_step_ms']:>8.1f} {s['torch_step_ms']:>8.1f} {s['speedup']:>7.2f}x")
    write_result(f"decode_attention_cpu_{cpu_kind()}", {"machine": machine_info(), "calls": calls, "engine_steps": steps})


if __name__ == "__main__":
    main()
