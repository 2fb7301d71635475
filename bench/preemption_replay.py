"""Recompute preemption under KV pressure: the real Scheduler and BlockAllocator replayed
over seeded arrival patterns, with no model (a chunk's tokens count as computed once
scheduled, a sequence samples token 1 when it reaches its end).

The cache is 256 blocks of 16 tokens (4096 tokens), the budget 512 tokens an iteration;
requests have 200-600 prompt tokens and 100-300 new tokens, so about ten in flight fill
the cache and the scheduler must preempt. Each pattern runs --iterations iterations, with
arrivals throughout, for each of --seeds seeds:
- every12 / every20 / every40: a request every 12, 20 or 40 iterations (the last below capacity);
- poisson20: exponential gaps of 20 iterations on average;
- burst: 8 requests at once every 160 iterations.
Reported per pattern (means over the seeds): recomputed, the share of computed tokens that
had been computed before (a preemption threw their keys and values away); preemptions;
requests finished within the run; mean iterations from arrival to the first token and to
the last, over the requests that got there.

    .venv/bin/python bench/preemption_replay.py [--seeds 3] [--iterations 4000]
"""

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.config import EngineConfig  # noqa: E402
from tandem.server.engine.kv_cache import BlockAllocator  # noqa: E402
from tandem.server.engine.outputs import FinishReason  # noqa: E402
from tandem.server.engine.sampling_params import SamplingParams  # noqa: E402
from tandem.server.engine.scheduler import Scheduler  # noqa: E402
from tandem.server.engine.sequence import Sequence  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, BUDGET, MAX_SEQS = 256, 16, 512, 128
PROMPT_LEN, NEW_TOKENS = (200, 600), (100, 300)


def every(period: int) -> Callable[[random.Random, int], list[int]]:
    return lambda rng, iterations: list(range(0, iterations, period))


def poisson(mean_gap: float) -> Callable[[random.Random, int], list[int]]:
    def arrivals(rng: random.Random, iterations: int) -> list[int]:
        times, t = [], 0.0
        while t < iterations:
            times.append(int(t))
            t += rng.expovariate(1 / mean_gap)
        return times

    return arrivals


def burst(size: int, period: int) -> Callable[[random.Random, int], list[int]]:
    return lambda rng, iterations: [t for t in range(0, iterations, period) for _ in range(size)]


PATTERNS = {
    "every12": every(12), "every20": every(20), "every40": every(40), "poisson20": poisson(20), "burst": burst(8, 160),
}


def replay(pattern: Callable[[random.Random, int], list[int]], seed: int, iterations: int) -> dict:
    """One run: the scheduler's iterations over the pattern's arrivals, with what they cost."""
    rng = random.Random(seed)
    config = EngineConfig(max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS)
    scheduler = Scheduler(config, BlockAllocator(NUM_BLOCKS, BLOCK_SIZE))
    arrivals = sorted(pattern(rng, iterations))
    born: dict[Sequence, int] = {}
    high: dict[Sequence, int] = {}  # the furthest each sequence has computed
    first_token, finished = [], []
    computed = recomputed = 0
    for it in range(iterations):
        while arrivals and arrivals[0] <= it:
            arrivals.pop(0)
            prompt = [1] * rng.randint(*PROMPT_LEN)
            seq = Sequence(f"r{len(born)}", len(prompt), prompt, SamplingParams(max_new_tokens=rng.randint(*NEW_TOKENS)), len(born))
            born[seq] = it
            scheduler.add(seq)
        for chunk in scheduler.schedule().inference:
            seq, n = chunk.seq, chunk.num_tokens
            recomputed += max(0, min(high.get(seq, 0), seq.num_computed + n) - seq.num_computed)
            computed += n
            seq.num_computed += n
            high[seq] = max(high.get(seq, 0), seq.num_computed)
            if seq.num_computed == len(seq.token_ids):
                seq.token_ids.append(1)
                if seq.num_generated == 1:
                    first_token.append(it - born[seq])
                if seq.num_generated >= seq.params.max_new_tokens:
                    scheduler.finish(seq, FinishReason.LENGTH)
                    finished.append(it - born[seq])
    return {
        "requests": len(born),
        "computed_tokens": computed,
        "recomputed_share": recomputed / computed,
        "preemptions": scheduler.num_preemptions,
        "finished": len(finished),
        "mean_iterations_to_first_token": statistics.fmean(first_token) if first_token else None,
        "mean_iterations_to_finish": statistics.fmean(finished) if finished else None,
    }


def summary(runs: list[dict]) -> dict:
    """Means over the seeds' runs."""
    return {key: statistics.fmean(r[key] for r in runs) for key in runs[0] if all(r[key] is not None for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeded runs per pattern")
    parser.add_argument("--iterations", type=int, default=4000, help="scheduler iterations per run")
    args = parser.parse_args()
    result = {
        "machine": machine_info(),
        "setup": {"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "budget": BUDGET, "max_num_seqs": MAX_SEQS,
                  "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "iterations": args.iterations, "seeds": args.seeds},
        "patterns": {},
    }
    print(f"{'pattern':<10} {'recomputed':>10} {'preempted':>9} {'finished':>8} {'first token':>11} {'finish':>7}")
    for name, pattern in PATTERNS.items():
        runs = [replay(pattern, seed, args.iterations) for seed in range(args.seeds)]
        s = result["patterns"][name] = summary(runs) | {"runs": runs}
        print(f"{name:<10} {s['recomputed_share']:>10.1%} {s['preemptions']:>9.1f} {s['finished']:>8.1f} "
              f"{s['mean_iterations_to_first_token']:>11.1f} {s['mean_iterations_to_finish']:>7.1f}")
    write_result("preemption_replay", result)


if __name__ == "__main__":
    main()
