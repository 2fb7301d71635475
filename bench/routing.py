"""Routed decoding (a router mixing k=2 of 8 experts per token and linear) against one adapter
and the base model, on SmolLM2.

32 concurrent requests (closed loop until --requests have run), prompt 32 random tokens,
--out-len generated tokens, greedy, ignore_eos. Eight rank-16 experts on all seven
projections and a router over them with random gates on every linear (top_k 2); the single-
adapter run uses the first expert. One engine serves the three kinds in turn (base, single,
routed), repeated --rounds times, and each ratio is taken within a round, so drift of a shared
machine hits both sides alike. Goal: routed >= 0.75x single-adapter throughput (MeteoRA
reports about 0.5x, loop-based MoE-LoRA 0.1-0.4x).

    .venv/bin/python bench/routing.py [--dtype float32] [--rounds 3] [--quick]
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lora_serving import load  # noqa: E402
from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.adapters.router_format import router_config, write_router  # noqa: E402
from tandem.server.config import DTYPES, EngineConfig  # noqa: E402
from tandem.server.engine.llm_engine import Engine  # noqa: E402
from tandem.server.engine.sampling_params import SamplingParams  # noqa: E402
from tandem.server.model.lora_targets import group_linears  # noqa: E402
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter  # noqa: E402

CONCURRENCY, PROMPT_LEN = 32, 32
EXPERTS, RANK, TOP_K = 8, 16, 2
GOAL = 0.75
KINDS = ("base", "single", "routed")


def make_experts(hf, loaded, root: Path) -> None:
    """EXPERTS rank-RANK adapters on every projection, and a router over them with random gates."""
    names = [f"expert{i}" for i in range(EXPERTS)]
    for i, name in enumerate(names):
        make_adapter(hf, root / name, r=RANK, target_modules=ALL_LINEAR, seed=i)
    g = torch.Generator().manual_seed(0)
    gates = {
        key: torch.randn(EXPERTS, linear.in_features, generator=g) / linear.in_features**0.5
        for key, linear in group_linears(loaded.model).items()
    }
    write_router(root / "router", router_config(names, TOP_K), gates)


def run(engine: Engine, adapter: str | None, prompts: list[list[int]], out_len: int) -> dict:
    """CONCURRENCY requests in flight until every prompt has run; generated tokens per second."""
    params = SamplingParams(temperature=0.0, max_new_tokens=out_len, ignore_eos=True)
    lora = None if adapter is None else engine.registry.get(adapter)
    nxt = generated = 0

    def submit() -> None:
        nonlocal nxt
        engine.add_request(f"{adapter}-{nxt}-{time.monotonic_ns()}", prompts[nxt], params, lora)
        nxt += 1

    gc.collect()
    start = time.perf_counter()
    while nxt < min(CONCURRENCY, len(prompts)):
        submit()
    while engine.has_work():
        for out in engine.step():
            generated += len(out.token_ids)
            if out.finished and nxt < len(prompts):
                submit()
    wall = time.perf_counter() - start
    assert generated == len(prompts) * out_len, (generated, len(prompts) * out_len)
    return {"tok_s": generated / wall, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out-len", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a tiny random model, one short round (a smoke run)")
    args = parser.parse_args()
    model = "tiny" if args.quick else "smollm2"
    rounds, requests = (1, 8) if args.quick else (args.rounds, args.requests)
    dtype = DTYPES[args.dtype]
    loaded, hf, _ = load(model, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(requests)]
    with tempfile.TemporaryDirectory(prefix="tandem-routing-bench-") as tmp:
        root = Path(tmp)
        make_experts(hf, loaded, root)
        engine = Engine(loaded, EngineConfig(
            max_num_seqs=CONCURRENCY, max_num_batched_tokens=512, adapters_dir=str(root), max_lora_rank=RANK,
            max_loras=EXPERTS + 1,
        ))
        adapters = {"base": None, "single": "expert0", "routed": "router"}
        run(engine, "router", prompts[:4], 2)  # warm-up: reads and loads every expert
        results = []
        for r in range(rounds):
            row = {kind: run(engine, adapters[kind], prompts, args.out_len) for kind in KINDS}
            row["routed_vs_single"] = row["routed"]["tok_s"] / row["single"]["tok_s"]
            row["single_vs_base"] = row["single"]["tok_s"] / row["base"]["tok_s"]
            row["routed_vs_base"] = row["routed"]["tok_s"] / row["base"]["tok_s"]
            results.append(row)
            print(f"round {r}: " + "  ".join(f"{k} {row[k]['tok_s']:.1f} tok/s" for k in KINDS)
                  + f"  routed/single {row['routed_vs_single']:.3f}")
    summary = {key: statistics.median(r[key] for r in results) for key in ("routed_vs_single", "single_vs_base", "routed_vs_base")}
    result = {
        "benchmark": "routing", "machine": machine_info(), "model": loaded.name, "dtype": args.dtype,
        "workload": {"concurrency": CONCURRENCY, "prompt_len": PROMPT_LEN, "out_len": args.out_len, "requests": requests,
                     "experts": EXPERTS, "rank": RANK, "top_k": TOP_K, "targets": list(ALL_LINEAR)},
        "rounds": results, "median": summary, "goal_routed_vs_single": GOAL,
        "meets_goal": summary["routed_vs_single"] >= GOAL,
    }
    print(f"{'kind':8s} {'tok/s (median)':>15s}")
    for kind in KINDS:
        print(f"{kind:8s} {statistics.median(r[kind]['tok_s'] for r in results):15.1f}")
    print(f"routed/single {summary['routed_vs_single']:.3f} (goal >= {GOAL}), single/base {summary['single_vs_base']:.3f}, "
          f"routed/base {summary['routed_vs_base']:.3f}")
    write_result(f"routing_cpu_{args.dtype}" + ("_quick" if args.quick else ""), result, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = result["rounds"]
    values = [statistics.median(r[k]["tok_s"] for r in rounds) for k in KINDS]
    bars = ax.bar(["base", "single adapter", f"router (k={TOP_K} of {EXPERTS})"], values, color=["gray", "tab:blue", "tab:orange"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center", va="bottom")
    single = values[1]
    ax.axhline(GOAL * single, color="k", linestyle="--", label=f"goal: {GOAL}x single adapter")
    ax.set_ylabel("generated tokens/s (median of rounds)")
    w = result["workload"]
    ax.set_title(f"{result['model']}, {result['dtype']}, {w['concurrency']} concurrent, rank {w['rank']}, "
                 f"routed/single {result['median']['routed_vs_single']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
