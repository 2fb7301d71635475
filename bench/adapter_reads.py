"""Adapter reads (disk -> host cache: read, sha256, parse, validate) into new memory vs into
the host slab (tandem/server/adapters/host_slab.py), inside a process that serves.

Part 1, reads: SmolLM2's shapes, D distinct rank-16 adapters on all seven projections
(~20 MB float32, as bench/lora_serving.py makes them). The process first serves (an engine
runs 32 requests, so the model, its KV cache and the allocator's churn are there, as in a
server), then reads adapters alternately into new memory (read_adapter's default buffer,
what the host cache did before the slab) and into a slab that has been filled once
(the steady state of a server whose cache is full: every read reuses touched memory), and
into a slab that grows as it is read (a server's first fill), --reads times each, so drift
of the machine hits every path alike. The same reads run in a fresh process (a
subprocess) for the reference the issue quotes. Reported: median ms per read, reads/s, and
the time in the read + hash pass alone.

Part 2, serving (not with --reads-only): bench/lora_serving.py's 2048-adapter workload
(uniform, 96 requests, 32 in flight, the real SmolLM2) through the engine with the slab and
with reads into new memory, each beside a no-adapter baseline: the ratio to the baseline
with and without the time spent reading adapters (registry.get).

    .venv/bin/python bench/adapter_reads.py [--quick] [--reads-only]
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.adapters.host_slab import ALIGN, HostSlab  # noqa: E402
from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, max_file_bytes, read_adapter, read_hashed  # noqa: E402
from tandem.server.adapters.registry import AdapterRegistry  # noqa: E402
from tandem.server.config import EngineConfig  # noqa: E402
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter  # noqa: E402

RANK = 16
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
PATHS = ("new_memory", "slab_full", "slab_growing")


def random_smollm2():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tandem.server.model.loader import build_from_hf

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPES), dtype=torch.float32)
    return hf, build_from_hf(hf, torch.float32, torch.device("cpu"))


def serve_a_little(hf) -> None:
    """What a serving process holds and has churned: an engine with its KV cache, 32 requests."""
    from tandem.server.engine.llm_engine import Engine
    from tandem.server.engine.sampling_params import SamplingParams
    from tandem.server.model.loader import LoadedModel, build_from_hf
    from tests.word_tokenizer import word_tokenizer

    loaded = LoadedModel(build_from_hf(hf, torch.bfloat16, torch.device("cpu")), word_tokenizer(49152), "random", "llama", [1])
    engine = Engine(loaded, EngineConfig(max_num_seqs=64, max_num_batched_tokens=512))
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    for i in range(32):
        engine.add_request(str(i), [100 + (i * 7 + j) % 40000 for j in range(32)], params)
    while engine.has_work():
        engine.step()


def read_times(model, dirs: list[Path], reads: int) -> dict:
    """ms per read_adapter and per read + hash pass, for each path, interleaved."""
    adapter_bytes = (dirs[0] / WEIGHTS_FILE).stat().st_size
    full = HostSlab(len(dirs) * (adapter_bytes + (1 << 16)))
    held = [read_adapter("w", d, model, RANK, buffer=full.block) for d in dirs]  # fill it once
    del held
    times = {p: {"read_adapter": [], "read_and_hash": []} for p in PATHS}
    for r in range(reads):
        d = dirs[r % len(dirs)]
        config = (d / CONFIG_FILE).read_bytes()
        for path in PATHS if r % 2 == 0 else reversed(PATHS):
            # A growing slab is a new one: its chunk, the block's size, is made (and touched) inside
            # the read. Blocks are whole pages (host_slab.ALIGN): a slab of the file's size holds none.
            buffer = {"new_memory": bytearray, "slab_full": full.block}.get(path) or HostSlab(-(-adapter_bytes // ALIGN) * ALIGN).block
            start = time.perf_counter()
            data = read_hashed(d / WEIGHTS_FILE, config, max_file_bytes(model, RANK), buffer)
            times[path]["read_and_hash"].append(time.perf_counter() - start)
            del data
            start = time.perf_counter()
            adapter = read_adapter("a", d, model, RANK, buffer=buffer)
            times[path]["read_adapter"].append(time.perf_counter() - start)
            del adapter
    return {
        p: {k: 1e3 * statistics.median(v) for k, v in t.items()} | {"reads_per_s": 1 / statistics.median(t["read_adapter"])}
        for p, t in times.items()
    }


def fresh_process(root: Path, count: int, reads: int) -> dict:
    """The same reads in a new process that has done nothing else."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, '.');"
        "from bench.adapter_reads import random_smollm2, read_times;"
        f"print(json.dumps(read_times(random_smollm2()[1], [Path({str(root)!r}) / f'a{{i}}' for i in range({count})], {reads})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(f"the fresh process failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def serving_ratios(requests: int) -> dict:
    """bench/lora_serving.py's 2048-adapter uniform run, with the slab and with new memory."""
    from bench import lora_serving as ls

    loaded, hf, _ = ls.load("smollm2", torch.bfloat16, torch.device("cpu"))
    vocab = loaded.model.shape.vocab_size
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab) for _ in range(ls.PROMPT_LEN)] for _ in range(requests)]
    tmp = Path(tempfile.mkdtemp(prefix="tandem-adapter-reads-"))
    slab_memory = AdapterRegistry._memory
    out = {}
    try:
        ls.make_adapters(hf, tmp, 2048)
        adapters = tmp / "adapters"
        choice = ls.draw(2048, "uniform", requests, seed=1000 + 2048)
        ls.engine_run(loaded, prompts[: ls.CONCURRENCY], 4, adapters, [i % 8 for i in range(ls.CONCURRENCY)])
        baselines = [ls.engine_run(loaded, prompts, ls.OUT_LEN)]
        for path in ("slab", "new_memory", "slab", "new_memory"):
            AdapterRegistry._memory = slab_memory if path == "slab" else (lambda self, name, size: bytearray(size))
            r = ls.engine_run(loaded, prompts, ls.OUT_LEN, adapters, choice)
            AdapterRegistry._memory = slab_memory
            baselines.append(ls.engine_run(loaded, prompts, ls.OUT_LEN))
            base = statistics.mean(b["tok_s"] for b in baselines[-2:])
            r |= {"baseline_tok_s": base, "ratio": r["tok_s"] / base, "ratio_without_reads": r["tok_s_without_reads"] / base,
                  "ms_per_read": 1e3 * r["get_s"] / r["distinct"]}
            out.setdefault(path, []).append(r)
            print(f"2048 adapters, reads into {path:10s}: {r['ratio']:.3f}x base ({r['ratio_without_reads']:.3f}x without reads), "
                  f"{r['distinct']} reads in {r['get_s']:.2f}s ({r['ms_per_read']:.1f} ms each)", flush=True)
    finally:
        AdapterRegistry._memory = slab_memory
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer reads, 32 requests in the serving part")
    ap.add_argument("--reads-only", action="store_true", help="part 1 only")
    ap.add_argument("--reads", type=int, help="reads per path (default 24, quick 8)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    reads = args.reads or (8 if args.quick else 24)
    count = 4
    info = machine_info()
    hf, model = random_smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-adapter-reads-"))
    try:
        dirs = [make_adapter(hf, tmp / f"a{i}", r=RANK, target_modules=ALL_LINEAR, seed=i) for i in range(count)]
        adapter_bytes = (dirs[0] / WEIGHTS_FILE).stat().st_size
        fresh = fresh_process(tmp, count, reads)
        serve_a_little(hf)
        gc.collect()
        serving = read_times(model, dirs, reads)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{adapter_bytes / 2**20:.1f} MiB adapters, median of {reads} reads per path")
    print(f"{'process':9s} {'path':13s} {'read_adapter ms':>16s} {'reads/s':>8s} {'read+hash ms':>13s}")
    for label, times in (("fresh", fresh), ("serving", serving)):
        for p in PATHS:
            t = times[p]
            print(f"{label:9s} {p:13s} {t['read_adapter']:16.1f} {t['reads_per_s']:8.1f} {t['read_and_hash']:13.1f}")
    ratios = None if args.reads_only else serving_ratios(32 if args.quick else 96)
    result = {
        "machine": info, "adapter_file_bytes": adapter_bytes, "reads_per_path": reads, "fresh_process": fresh,
        "serving_process": serving, "serving_2048_uniform": ratios,
        "speedup_slab_full_vs_new_memory_serving": serving["new_memory"]["read_adapter"] / serving["slab_full"]["read_adapter"],
        "notes": [
            "read_adapter: the whole read (read + sha256 in one pass, safetensors parse, pairing, shape and finiteness "
            "checks); read_and_hash: the read + sha256 pass alone. The files sit in the page cache: no disk is timed.",
            "new_memory: a bytearray per read (before the slab, every read); slab_full: a slab filled once before, so every "
            "read reuses touched memory (a server whose cache is full); slab_growing: a new slab per read, its chunk made "
            "and touched inside the read (a server's first fill of its cache).",
            "serving_2048_uniform: bench/lora_serving.py's workload (SmolLM2 bfloat16, 96 requests, 32 in flight, 64 slots, "
            "2048 adapters drawn uniformly, a fresh engine per run) with the registry reading into its slab or into new "
            "memory; ratio against the mean of the no-adapter baselines just before and after.",
        ],
    }
    write_result("adapter_reads" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
