"""A decoder layer's elementwise work on CPU: the C kernels (kernels/fused_elementwise_cpu.c)
against the torch ops they replace, in one run.

1. Per layer, SmolLM2's shapes (hidden 576, 9 query and 3 KV heads of 64, MLP 1536): the
   input RMSNorm, the residual add with the post-attention RMSNorm, rope of q and k and
   SiLU(gate) * up, through the kernels and through torch, for decode-sized and
   prefill-sized row counts. Reports microseconds per layer and the ratio.
2. In the engine, SmolLM2 decode steps with 8, 16 and 32 running sequences, the kernels
   switched on and off (TANDEM_NATIVE_ELEMENTWISE) between interleaved rounds of steps.

    .venv/bin/python bench/fused_elementwise.py [--quick]
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
from tandem.kernels import fused_elementwise  # noqa: E402
from tandem.kernels.rms_norm import _forward as torch_rms_norm  # noqa: E402
from tandem.server.model.llama import Rotary  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, EPS = 576, 9, 3, 64, 1536, 1e-5
ROWS = (1, 16, 32, 512)
STEP_SEQUENCES = (8, 16, 32)


def per_layer(rows: int, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, HIDDEN, generator=g).to(dtype) for _ in range(2))
    weight = torch.rand(HIDDEN, generator=g).to(dtype)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    angle = torch.rand(rows, 1, HEAD_DIM, generator=g) * 100
    table = angle.cos().to(dtype), angle.sin().to(dtype)
    gate_up = torch.randn(rows, 2 * INTER, generator=g).to(dtype)

    def kernels() -> None:
        fused_elementwise.rms_norm(x, weight, EPS)
        fused_elementwise.rope(qkv, *table, HEADS, KV_HEADS)
        fused_elementwise.rms_norm(x, weight, EPS, delta)
        fused_elementwise.silu_mul(gate_up)

    def torch_ops() -> None:
        torch_rms_norm(x, weight, EPS)
        q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        Rotary.apply(q.view(rows, HEADS, HEAD_DIM), table)
        Rotary.apply(k.view(rows, KV_HEADS, HEAD_DIM), table)
        torch_rms_norm(x + delta, weight, EPS)
        gate, up = gate_up.split(INTER, dim=-1)
        F.silu(gate) * up

    best = {"kernels": float("inf"), "torch": float("inf")}
    for _ in range(repeats):
        for name, fn in (("kernels", kernels), ("torch", torch_ops)):
            started = time.perf_counter()
            for _ in range(30):
                fn()
            best[name] = min(best[name], (time.perf_counter() - started) / 30)
    return {
        "rows": rows, "dtype": str(dtype).removeprefix("torch."), "kernels_us": 1e6 * best["kernels"],
        "torch_us": 1e6 * best["torch"], "speedup": best["torch"] / best["kernels"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, bfloat16 only (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if fused_elementwise.library() is None:
        sys.exit("the C kernels are not built here (no compiler, or TANDEM_NATIVE_ELEMENTWISE=0): nothing to compare")
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float32)
    layers = [per_layer(rows, dtype, repeats=3 if args.quick else 15) for dtype in dtypes for rows in ROWS]
    print(f"{'dtype':>8} {'rows':>5} {'kernels us':>11} {'torch us':>9} {'speedup':>8}   (one layer's elementwise work)")
    for r in layers:
        print(f"{r['dtype']:>8} {r['rows']:>5} {r['kernels_us']:>11.1f} {r['torch_us']:>9.1f} {r['speedup']:>7.2f}x")
    rounds, count = (2, 4) if args.quick else (6, 8)
    steps = [
        toggled_decode_steps(n, rounds, count, "TANDEM_NATIVE_ELEMENTWISE", fused_elementwise.library.cache_clear, str(dtype).removeprefix("torch."))
        for dtype in dtypes for n in STEP_SEQUENCES
    ]
    print("\nSmolLM2 decode step: dtype, sequences, kernels ms, torch ms, speedup")
    for s in steps:
        print(f"{s['dtype']:>8} {s['sequences']:>5} {s['kernel_step_ms']:>8.1f} {s['torch_step_ms']:>8.1f} {s['speedup']:>7.2f}x")
    write_result(f"fused_elementwise_cpu_{cpu_kind()}", {"machine": machine_info(), "layers": layers, "engine_steps": steps})


if __name__ == "__main__":
    main()
