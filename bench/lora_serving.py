"""Multi-LoRA serving throughput on SmolLM2 against the same engine without adapters and `peft`.

32 concurrent requests (closed loop: a finished request is replaced at once by the next one,
until --requests have run), prompt 32 random tokens, 64 generated tokens, greedy, ignore_eos.
Rank-16 adapters on all seven projections, a device pool of 64 slots. Each request draws its
adapter from 1, 8, 64, 512 or 2048 distinct adapters, uniformly or with Zipf (alpha = 1)
popularity; one more run uses 8 adapters on q_proj and v_proj only (PEFT's default targets).
Every run gets a fresh engine (cold host cache and slot pool), so adapter reads
(disk -> host: hash, parse, regroup) and slot loads (host -> slot copy) are inside the
timed run and reported apart. Each run is paired with a baseline (a fresh engine without
adapters, the same requests) in lock step: one step of each in turn, each side timed over
its own steps (plus the adapter side's reads), so the drift of a shared machine, which moved
back-to-back runs 10-15% apart here, hits both sides alike. `peft` runs the 8-adapter case as mixed-adapter
batched `generate` (one adapter name per row), in the serving dtype, between two Tandem runs
of the same requests.

Beside each ratio: the floor this machine allows for that run (measured in the same run): the
paired baseline's time, plus the adapter bytes the run streams (each decode or prefill
step reads every adapter in its batch once, and each slot load copies one) over a large copy's
bandwidth, plus the LoRA FLOPs over a large GEMM's rate in the slots' dtype; with reads, plus
each used adapter's file hashed once at the measured SHA-256 rate (the issue requires the
file's SHA-256; no read can take less, however the rest of it is done). And the share of
step time spent in the served LoRA calls, from torch's profiler over a few steps of a full batch
with the run's adapter mix (a separate, untimed engine), with the calls and ops per step.

Only 8 really distinct weight files are made (disk: ~20 MB each in float32); every other
adapter directory hard-links one of them and has its own adapter_config.json (an extra
"revision" field), so every adapter has its own content hash and is read, parsed and copied
into a slot like a real one. The adapters live in a temp dir removed at the end.

With 2048 adapters drawn by Zipf, 96 requests are three waves of the closed loop: 61
distinct adapters, all of which the host cache holds, so none is read twice. --zipf-requests
runs that case (and its paired baseline) on more requests (1024: 405 distinct, more than the
2 GiB host cache holds), so that the host cache evicts and reads again as a long-running
server's does; the other runs keep --requests.

    .venv/bin/python bench/lora_serving.py [--dtype bfloat16] [--quick] [--zipf-requests 1024]
    PYTHONPATH=. python bench/lora_serving.py --model llama-8b --device cuda   # on a GPU host
"""

import argparse
import collections
import copy
import cProfile
import gc
import hashlib
import itertools
import json
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lora_kernels import copy_bandwidth, timeit  # noqa: E402
from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from tandem.server.adapters.slot_pool import SlotPool  # noqa: E402
from tandem.server.config import DTYPES, EngineConfig  # noqa: E402
from tandem.server.engine.llm_engine import Engine  # noqa: E402
from tandem.server.engine.sampling_params import SamplingParams  # noqa: E402
from tandem.server.heap import frozen_heap  # noqa: E402
from tandem.server.model.loader import LoadedModel, build_from_hf, default_model_path, eos_token_ids  # noqa: E402
from tandem.server.model.lora_linear import LoRALinear  # noqa: E402
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter  # noqa: E402
from tests.word_tokenizer import word_tokenizer  # noqa: E402

CONCURRENCY, PROMPT_LEN, OUT_LEN = 32, 32, 64
RANK, SLOTS, DISTINCT_FILES = 16, 64, 8
# PEFT's default target_modules for Llama: the common adapter in the wild.
QV_ONLY = ("q_proj", "v_proj")
# Issue 10's goals on the CPU.
GOALS = {"8_adapters_vs_base": 0.85, "8_qv_adapters_vs_base": 0.9, "2048_zipf_adapters_vs_base": 0.7, "vs_peft": 4.0}
PROFILED_STEPS = 5
# The Triton kernels a served LoRA call launches (kernels/lora/triton_sgmv.py).
LORA_KERNELS = ("_fused_kernel", "_shrink_kernel", "_expand_kernel")


# Randomly initialised Llama shapes for machines without the SmolLM2 file (the GPU hosts):
# the compute per token is the real model's. "tiny" is for a smoke run on CPU.
RANDOM_MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def load(model: str, dtype: torch.dtype, device: torch.device):
    """Our model and the transformers one it is built from (for adapters and peft), and a tokenizer.

    smollm2: the embedded GGUF through transformers in float32 on the CPU (peft's copy moves
    to the device). Random shapes: built on the device in the serving dtype, with a word-level
    tokenizer over the vocabulary (prompts are random token ids; only decoding needs it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if model == "smollm2":
        path = default_model_path()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
        name = path.stem
    else:
        config = LlamaConfig(**RANDOM_MODELS[model], max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tok = word_tokenizer(config.vocab_size)
        name = f"random {model}"
    loaded = LoadedModel(build_from_hf(hf, dtype, device), tok, name, "llama", eos_token_ids(hf, tok))
    return loaded, hf.eval(), tok


def adapter_name(i: int) -> str:
    return f"a{i:04d}"


def make_adapters(hf, root: Path, count: int) -> dict:
    """count adapter directories from DISTINCT_FILES weight files (hard links, own configs)."""
    start = time.perf_counter()
    bases = [make_adapter(hf, root / "_files" / f"w{i}", r=RANK, target_modules=ALL_LINEAR, seed=i) for i in range(min(count, DISTINCT_FILES))]
    base_configs = [json.loads((b / "adapter_config.json").read_text()) for b in bases]
    for i in range(count):
        d = root / "adapters" / adapter_name(i)
        d.mkdir(parents=True)
        src = bases[i % len(bases)]
        os.link(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({**base_configs[i % len(bases)], "revision": i}))
    for i in range(min(count, DISTINCT_FILES)):
        make_adapter(hf, root / "adapters" / qv_name(i), r=RANK, target_modules=QV_ONLY, seed=100 + i)
    return {
        "seconds": time.perf_counter() - start,
        "weight_file_bytes": (bases[0] / "adapter_model.safetensors").stat().st_size,
        "qv_weight_file_bytes": (root / "adapters" / qv_name(0) / "adapter_model.safetensors").stat().st_size,
    }


def qv_name(i: int) -> str:
    return f"qv{i:04d}"


def draw(num_adapters: int, popularity: str, n: int, seed: int) -> list[int]:
    """Adapter index of each request: uniform, or Zipf(1) over popularity rank = index."""
    rng = random.Random(seed)
    if popularity == "uniform":
        return [rng.randrange(num_adapters) for _ in range(n)]
    cum = list(itertools.accumulate(1.0 / (k + 1) for k in range(num_adapters)))
    return rng.choices(range(num_adapters), cum_weights=cum, k=n)


# --eager: every step launches every op (no CUDA graphs), for the comparison.
CUDA_GRAPHS = True


def engine_config(loaded: LoadedModel, adapters_dir: Path | None) -> EngineConfig:
    """SLOTS device slots whatever the model: the pool's budget fits SLOTS float32 slots (the
    default 4 GiB holds 51 of Llama-8B's in bf16). No more sequences than the workload keeps in
    flight: on CUDA the engine captures a decode graph per batch-size bucket up to that at start."""
    return EngineConfig(
        max_num_seqs=CONCURRENCY, max_num_batched_tokens=512, cuda_graphs=CUDA_GRAPHS,
        adapters_dir=None if adapters_dir is None else str(adapters_dir), max_lora_rank=RANK, max_loras=SLOTS,
        lora_pool_bytes=SLOTS * SlotPool.slot_bytes(loaded.model, RANK, torch.float32),
    )


class Workload:
    """A fresh engine working through the prompts, CONCURRENCY requests in flight, one step
    per call of step(), so that two workloads can alternate steps (paired_run)."""

    def __init__(
        self, loaded: LoadedModel, prompts: list[list[int]], out_len: int, adapters_dir: Path | None = None,
        choice: list[int] | None = None, naming=adapter_name,
    ):
        started = time.perf_counter()
        self.engine = Engine(loaded, engine_config(loaded, adapters_dir))
        # Not in the run's time: a server starts once (on CUDA this captures the decode graphs).
        self.start_s = time.perf_counter() - started
        graphs = self.engine.runner.graphs
        self.captured_at_start = 0 if graphs is None else graphs.captures
        # An adapter's bytes in a slot (read as float32; slots hold the pool's dtype, slot_pool.slot_dtype).
        self.pool_itemsize = 0 if self.engine.registry is None else self.engine.registry.pool.dtype.itemsize
        self.prompts, self.out_len, self.choice, self.naming = prompts, out_len, choice, naming
        self.params = SamplingParams(temperature=0.0, max_new_tokens=out_len, ignore_eos=True)
        self.get_s = self.step_s = self.decode_step_s = 0.0
        self.decode_steps = 0
        self.nxt = self.generated = self.steps = self.lora_flops = self.streamed = 0
        self.distinct_per_step: list[int] = []
        self.adapter_bytes: list[int] = []
        self._submit(min(CONCURRENCY, len(prompts)))

    def _submit(self, count: int) -> None:
        """The next count requests, arriving together: their adapters resolved at once, each
        in a thread, as the server's AsyncEngine resolves each request's (asyncio.to_thread,
        whose default pool this is); the registry reads an adapter once however many ask.
        The wait is the run's, not overlapped with its steps."""
        indices = range(self.nxt, min(self.nxt + count, len(self.prompts)))
        adapters = [None] * len(indices)
        if self.choice is not None and indices:
            t = time.perf_counter()
            with ThreadPoolExecutor() as pool:
                adapters = list(pool.map(self.engine.registry.get, [self.naming(self.choice[i]) for i in indices]))
            self.get_s += time.perf_counter() - t
        for i, adapter in zip(indices, adapters):
            if adapter is not None:
                self.adapter_bytes.append(adapter.nbytes // 4 * self.pool_itemsize)
                # 2 FLOPs per adapter parameter per token through the model (the last one sampled is not).
                self.lora_flops += 2 * (adapter.nbytes // 4) * (len(self.prompts[i]) + self.out_len - 1)
            self.engine.add_request(str(i), self.prompts[i], self.params, adapter)
        self.nxt = indices.stop

    def step(self) -> bool:
        """One engine step (and the submissions it makes room for); False once all is done."""
        engine = self.engine
        if not engine.has_work():
            return False
        in_step = {seq.slot: seq.adapter.nbytes // 4 * self.pool_itemsize for seq in engine.scheduler.running if seq.slot is not None}
        self.distinct_per_step.append(len(in_step))
        self.streamed += sum(in_step.values())
        prefilled = engine.iteration_tokens["prefill"]
        t = time.perf_counter()
        outs = engine.step()
        took = time.perf_counter() - t
        self.step_s += took
        self.steps += 1
        if engine.iteration_tokens["prefill"] == prefilled:
            self.decode_steps += 1
            self.decode_step_s += took
        self.generated += sum(len(o.token_ids) for o in outs)
        self._submit(sum(o.finished for o in outs))
        return True

    def result(self, wall: float) -> dict:
        assert self.generated == len(self.prompts) * self.out_len, (self.generated, len(self.prompts) * self.out_len)
        generated, engine = self.generated, self.engine
        graphs = engine.runner.graphs
        result = {"tok_s": generated / wall, "wall_s": wall, "step_s": self.step_s, "get_s": self.get_s, "steps": self.steps,
                  "generated": generated, "decode_steps": self.decode_steps,
                  "decode_step_ms": 1e3 * self.decode_step_s / max(self.decode_steps, 1), "engine_start_s": self.start_s, "graphs_captured_at_start": self.captured_at_start,
                  "graphs_captured_while_serving": 0 if graphs is None else graphs.captures - self.captured_at_start}
        if engine.registry is not None:
            s = engine.registry.slot_stats()
            result.update(
                distinct=len(set(self.choice)), mean_adapters_per_step=statistics.mean(self.distinct_per_step),
                adapter_bytes=statistics.mean(self.adapter_bytes), slot_itemsize=self.pool_itemsize,
                slot_dtype=str(engine.registry.pool.dtype).removeprefix("torch."), lora_flops=self.lora_flops,
                adapter_bytes_streamed=self.streamed, slot_loads=s.loads, slot_evictions=s.evictions,
                slot_load_s=s.load_seconds_total, host_evictions=s.host_evictions, tok_s_without_reads=generated / (wall - self.get_s),
            )
        return result


def engine_run(
    loaded: LoadedModel, prompts: list[list[int]], out_len: int, adapters_dir: Path | None = None,
    choice: list[int] | None = None, naming=adapter_name,
) -> dict:
    """A fresh engine; CONCURRENCY requests in flight until every prompt has run. Its time is
    its steps and adapter reads, not its start (which touches the adapter cache's budget)."""
    gc.collect()
    work = Workload(loaded, prompts, out_len, adapters_dir, choice, naming)
    with frozen_heap():
        while work.step():
            pass
    result = work.result(work.step_s + work.get_s)
    del work
    gc.collect()
    return result


def paired_run(
    loaded: LoadedModel, prompts: list[list[int]], out_len: int, adapters_dir: Path, choice: list[int], naming
) -> tuple[dict, dict]:
    """The adapter workload and the same workload without adapters, in lock step: one step of
    each in turn, so a shared machine's drift falls on both alike. Each side's time is its own
    steps (plus, for the adapter side, its adapter reads): (adapters, baseline)."""
    gc.collect()
    base = Workload(loaded, prompts, out_len)
    lora = Workload(loaded, prompts, out_len, adapters_dir, choice, naming)
    with frozen_heap():
        while lora.step() | base.step():
            pass
    results = lora.result(lora.step_s + lora.get_s), base.result(base.step_s)
    del base, lora
    gc.collect()
    return results


def lora_share(
    loaded: LoadedModel, prompts: list[list[int]], adapters_dir: Path | None, choice: list[int] | None, naming=adapter_name
) -> dict:
    """The share of decode-step time spent in the served LoRA calls (LoRALinear.add_served),
    from torch's profiler over PROFILED_STEPS steps of a full batch: a fresh engine with the
    first CONCURRENCY requests of the run, every prompt prefilled before profiling starts.
    Also the LoRA calls per step and the torch ops each dispatches (the profiler's top-level
    events inside a call). The profiler's own cost per op inflates both sides a little. On
    CUDA the CPU time of a call is its launches, so there the share is also taken of the
    kernel time: the LoRA kernels' time against all that the steps launched, with the
    kernels that took the most time. Without adapters (choice None): the base step's profile."""
    engine = Engine(loaded, engine_config(loaded, adapters_dir))
    params = SamplingParams(temperature=0.0, max_new_tokens=OUT_LEN, ignore_eos=True)
    for i in range(CONCURRENCY):
        engine.add_request(str(i), prompts[i], params, None if choice is None else engine.registry.get(naming(choice[i])))
    while engine.scheduler.waiting or any(seq.num_generated == 0 for seq in engine.scheduler.running):
        engine.step()
    engine.step()
    add_served = LoRALinear.add_served

    def recorded(self, *args):
        with torch.profiler.record_function("lora"):
            add_served(self, *args)

    LoRALinear.add_served = recorded
    on_cuda = next(loaded.model.parameters()).is_cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    try:
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(PROFILED_STEPS):
                with torch.profiler.record_function("step"):
                    engine.step()
    finally:
        LoRALinear.add_served = add_served
    events = prof.events()
    host = host_profile(engine)
    step_us = sum(e.cpu_time_total for e in events if e.name == "step")
    calls = [e for e in events if e.name == "lora"]
    lora_us = sum(e.cpu_time_total for e in calls)
    ops = sum(len(e.cpu_children) for e in calls)
    del engine
    gc.collect()
    share = {
        "lora_share": lora_us / step_us, "profiled_step_ms": step_us / 1e3 / PROFILED_STEPS,
        "lora_ms_per_step": lora_us / 1e3 / PROFILED_STEPS, "lora_calls_per_step": len(calls) / PROFILED_STEPS,
        "ops_per_lora_call": ops / max(len(calls), 1), "host_top": host,
    }
    if on_cuda:
        # The record_function ranges ("step", "lora") also show as device events spanning their kernels.
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in ("step", "lora")]
        step_kernel_us = sum(e.device_time_total for e in kernels)
        # By name, not by call: a replayed CUDA graph runs no Python, so no call is recorded.
        lora_kernel_us = sum(e.device_time_total for e in kernels if e.name in LORA_KERNELS)
        by_name = collections.Counter()
        launches = collections.Counter()
        for e in kernels:
            by_name[e.name] += e.device_time_total
            launches[e.name] += 1
        share |= {
            "lora_kernel_share": lora_kernel_us / step_kernel_us if step_kernel_us else None,
            "lora_kernel_ms_per_step": lora_kernel_us / 1e3 / PROFILED_STEPS,
            "step_kernel_ms": step_kernel_us / 1e3 / PROFILED_STEPS,
            "kernel_launches_per_step": len(kernels) / PROFILED_STEPS,
            "top_kernels": [
                {"kernel": name[:160], "us_per_step": us / PROFILED_STEPS, "launches_per_step": launches[name] / PROFILED_STEPS}
                for name, us in by_name.most_common(12)
            ],
        }
    return share


def host_profile(engine: Engine) -> list[dict]:
    """Where a step's host time goes: cProfile over PROFILED_STEPS more steps, the functions
    with the most time of their own (a sync's wait for the device shows as the op that syncs)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(PROFILED_STEPS):
        engine.step()
    profiler.disable()
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: item[1][2], reverse=True)[:15]
    return [
        {"function": f"{Path(file).name}:{line}({name})", "ms_per_step": own * 1e3 / PROFILED_STEPS, "calls_per_step": calls / PROFILED_STEPS}
        for (file, line, name), (_, calls, own, _, _) in rows
    ]


def profile_line(label: str, profile: dict) -> str:
    """A profiled step in one line: its CPU time, and on CUDA its kernel time and top kernels."""
    line = f"{label}: {profile['profiled_step_ms']:.1f} ms of CPU time"
    if "step_kernel_ms" in profile:
        top = "; ".join(f"{k['kernel'][:48]} {k['us_per_step'] / 1e3:.2f} ms" for k in profile["top_kernels"][:4])
        line += (f", {profile['step_kernel_ms']:.1f} ms of kernels in {profile['kernel_launches_per_step']:.0f} launches "
                 f"(top: {top})")
    host = "; ".join(f"{h['function']} {h['ms_per_step']:.2f} ms" for h in profile["host_top"][:5])
    return line + f"\n    host, own time per step: {host}"


def machine_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """What the floors divide by: a large copy's bandwidth (read + write bytes per second),
    the FLOP rate of a large GEMM in the slots' dtype (1024 x 576 x 1536, SmolLM2's MLP), and
    one thread's SHA-256 rate (hashlib, OpenSSL: SHA-NI where the CPU has it) over 64 MiB."""
    a = torch.randn(1024, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    seconds = min(timeit([lambda: a @ b], device, calls=20, budget=2.0))
    data = os.urandom(64 << 20)
    hashing = []
    for _ in range(3):
        started = time.perf_counter()
        hashlib.sha256(data).digest()
        hashing.append(time.perf_counter() - started)
    return {"copy_bytes_per_s": copy_bandwidth(device), "gemm_flops_per_s": 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds,
            "gemm_dtype": str(dtype).removeprefix("torch."), "sha256_bytes_per_s": len(data) / min(hashing)}


def floor_ratio(run: dict, base_s: float, rates: dict, hashed_bytes: int = 0, threads: int = 1) -> float:
    """The best ratio to the baseline this run's adapter work allows here: the baseline's
    time plus the adapter bytes streamed and loaded at copy bandwidth (a slot load reads and
    writes them) plus the LoRA FLOPs at the large-GEMM rate, plus hashed_bytes of adapter
    files at the SHA-256 rate, spread over threads (every read hashes its file, one stream)."""
    moved = run["adapter_bytes_streamed"] + 2 * run["slot_loads"] * run["adapter_bytes"]
    hashing = hashed_bytes / rates["sha256_bytes_per_s"] / threads
    return base_s / (base_s + moved / rates["copy_bytes_per_s"] + run["lora_flops"] / rates["gemm_flops_per_s"] + hashing)


def peft_model(hf, adapters_root: Path, names: list[str], dtype: torch.dtype, device: torch.device | None = None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapters_root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters_root / name), adapter_name=name)
    return model.to(device=next(hf.parameters()).device if device is None else device, dtype=dtype).eval()


def peft_run(model, prompts: list[list[int]], names: list[str], out_len: int, pad_id: int) -> dict:
    """Batches of CONCURRENCY rows, each row with its own adapter (peft's mixed batches)."""
    generated = 0
    with frozen_heap():
        start = time.perf_counter()
        for i in range(0, len(prompts), CONCURRENCY):
            ids = torch.tensor(prompts[i : i + CONCURRENCY], device=model.device)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names[i : i + CONCURRENCY],
                    max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=pad_id,
                )
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        wall = time.perf_counter() - start
    return {"tok_s": generated / wall, "wall_s": wall, "generated": generated}


def sizes(loaded: LoadedModel, dtype: torch.dtype) -> dict:
    """Bytes a decode step streams: the base linears (serving dtype) and one adapter's slot."""
    m = loaded.model
    base = sum(p.numel() for layer in m.layers for p in layer.parameters()) + m.lm_head.numel()
    lora = SlotPool.slot_bytes(m, RANK, torch.float32) // 4
    item = torch.empty((), dtype=dtype).element_size()
    return {
        "base_params_per_token": base, "base_bytes": base * item, "adapter_params": lora,
        "adapter_slot_bytes_float32": lora * 4, "adapter_fraction_of_base_params": lora / base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", *RANDOM_MODELS],
                    help="the embedded SmolLM2, or a randomly initialised Llama shape (GPU hosts have no SmolLM2 file)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, help=f"requests per run (default 96, quick 32), {CONCURRENCY} in flight")
    ap.add_argument("--quick", action="store_true", help="1, 8 and 64 adapters, uniform only, no peft")
    ap.add_argument("--zipf-requests", type=int, help="requests of the 2048-adapter Zipf run (default: --requests)")
    ap.add_argument("--eager", action="store_true", help="CUDA: no decode graphs (every op launched), for comparison")
    args = ap.parse_args()
    global CUDA_GRAPHS
    CUDA_GRAPHS = not args.eager
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    n_req = args.requests or (32 if args.quick else 96)
    counts = (1, 8, 64) if args.quick else (1, 8, 64, 512, 2048)
    popularities = ("uniform",) if args.quick else ("uniform", "zipf")
    info = machine_info()
    device = torch.device(args.device)
    loaded, hf, tok = load(args.model, dtype, device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = loaded.model.shape.vocab_size
    rng = random.Random(0)
    zipf_req = max(n_req, args.zipf_requests or n_req)
    longest = [[rng.randrange(100, vocab) for _ in range(PROMPT_LEN)] for _ in range(zipf_req)]
    prompts = longest[:n_req]
    tmp = Path(tempfile.mkdtemp(prefix="tandem-lora-bench-"))
    try:
        made = make_adapters(hf, tmp, max(counts))
        adapters_dir = tmp / "adapters"
        print(f"made {max(counts)} adapters ({DISTINCT_FILES} distinct weight files of {made['weight_file_bytes'] / 2**20:.1f} MiB) in {made['seconds']:.1f}s", flush=True)
        runs = [(n, "uniform", "all") for n in counts if n == 1]
        for n in counts:
            runs += [(n, p, "all") for p in popularities if n > 1]
            if n == 8:
                runs.append((8, "uniform", "qv"))
        peft_choice = draw(8, "uniform", n_req, seed=8)
        peft_names = [adapter_name(i) for i in peft_choice]
        pm = None if args.quick else peft_model(hf, adapters_dir, [adapter_name(i) for i in range(8)], dtype, device)

        # Warm-up: kernel selection, allocator growth, first-touch pages, on every side.
        warm = prompts[:CONCURRENCY]
        engine_run(loaded, warm, 4)
        slot_dtype = DTYPES[engine_run(loaded, warm, 4, adapters_dir, [i % 8 for i in range(len(warm))])["slot_dtype"]]
        if pm is not None:
            peft_run(pm, warm, peft_names[: len(warm)], 4, pad)
        rates = [machine_rates(device, slot_dtype)]
        base_profile = lora_share(loaded, prompts, None, None)
        print(profile_line("base step", base_profile), flush=True)

        results = []
        base_bytes = sizes(loaded, dtype)["base_bytes"]
        for n, pop, targets in runs:
            run_prompts = longest if (n, pop) == (2048, "zipf") else prompts
            choice = draw(n, pop, len(run_prompts), seed=1000 + n + (0 if pop == "uniform" else 1))
            naming = adapter_name if targets == "all" else qv_name
            ours, base = paired_run(loaded, run_prompts, OUT_LEN, adapters_dir, choice, naming)
            r = {"adapters": n, "popularity": pop, "targets": targets, "requests": len(run_prompts), **ours, "baseline": base}
            r["baseline_tok_s"] = base["tok_s"]
            r["ratio"] = r["tok_s"] / base["tok_s"]
            r["ratio_without_reads"] = r["tok_s_without_reads"] / base["tok_s"]
            # What a step streams besides the base weights: each adapter in the batch once, as the pool holds it.
            r["adapter_bytes_per_step_vs_base"] = r["mean_adapters_per_step"] * r["adapter_bytes"] / base_bytes
            r["floor_ratio"] = floor_ratio(r, base["step_s"], rates[0])
            # Each adapter the run used was read (hashed) at least once.
            file_bytes = made["weight_file_bytes"] if targets == "all" else made["qv_weight_file_bytes"]  # a q/v file is ~5x smaller
            r["floor_ratio_with_reads"] = floor_ratio(r, base["step_s"], rates[0], r["distinct"] * file_bytes, args.threads)
            r.update(lora_share(loaded, prompts, adapters_dir, choice, naming))
            results.append(r)
            print(
                f"{n:5d} adapters {pop:7s} {targets:3s} ({r['distinct']:3d} used, {r['mean_adapters_per_step']:4.1f}/step, "
                f"{r['adapter_bytes_per_step_vs_base']:4.2f}x base bytes)  "
                f"{r['tok_s']:7.1f} tok/s  {r['ratio']:4.2f}x base "
                f"({r['ratio_without_reads']:4.2f}x without adapter reads; floor {r['floor_ratio']:4.2f}x, "
                f"{r['floor_ratio_with_reads']:4.2f}x with reads' SHA-256)  "
                f"LoRA {100 * r['lora_share']:4.1f}% of a step ({r['lora_calls_per_step']:.0f} calls x {r['ops_per_lora_call']:.1f} ops"
                + (f"; {100 * r['lora_kernel_share']:4.1f}% of its kernel time" if r.get("lora_kernel_share") is not None else "") + ")  "
                f"reads {r['get_s']:5.2f}s  "
                f"slot loads {r['slot_loads']:4d} evictions {r['slot_evictions']:4d} {r['slot_load_s']:5.2f}s  "
                f"host evictions {r['host_evictions']:4d}  steps {r['step_s']:5.1f}s (a decode step {r['decode_step_ms']:.2f} ms, "
                f"the baseline's {base['decode_step_ms']:.2f})  start {r['engine_start_s']:4.1f}s "
                f"({r['graphs_captured_at_start']} graphs; {r['graphs_captured_while_serving']} later)  "
                f"[paired baseline {base['tok_s']:.1f} tok/s]",
                flush=True,
            )
            print(profile_line("  its step", r), flush=True)
        peft = None
        if pm is not None:
            # Tandem on the same requests (same adapters per row) just before and after peft.
            ours = [engine_run(loaded, prompts, OUT_LEN, adapters_dir, peft_choice)["tok_s"]]
            peft = peft_run(pm, prompts, peft_names, OUT_LEN, pad)
            ours.append(engine_run(loaded, prompts, OUT_LEN, adapters_dir, peft_choice)["tok_s"])
            peft["tandem_8_adapters_tok_s"] = ours
            peft["speedup"] = statistics.mean(ours) / peft["tok_s"]
            print(f"peft mixed batch, 8 adapters    {peft['tok_s']:7.1f} tok/s  tandem {peft['speedup']:.2f}x faster", flush=True)
            del pm
        rates.append(machine_rates(device, slot_dtype))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    goals = {}
    by = {(r["adapters"], r["popularity"], r["targets"]): r for r in results}
    for key, name in (((8, "uniform", "all"), "8_adapters_vs_base"), ((8, "uniform", "qv"), "8_qv_adapters_vs_base"),
                      ((2048, "zipf", "all"), "2048_zipf_adapters_vs_base")):
        if key in by:
            goals[name] = {"goal": GOALS[name], "ratio": by[key]["ratio"], "floor": by[key]["floor_ratio"],
                           "floor_with_reads": by[key]["floor_ratio_with_reads"]}
    if peft is not None:
        goals["vs_peft"] = {"goal": GOALS["vs_peft"], "speedup": peft["speedup"]}
    result = {
        "machine": info, "model": loaded.name, "device": device.type, "dtype": args.dtype, "threads": args.threads,
        "workload": {
            "concurrency": CONCURRENCY, "requests_per_run": n_req, "zipf_2048_requests": zipf_req, "prompt_len": PROMPT_LEN, "output_len": OUT_LEN,
            "greedy": True, "ignore_eos": True, "rank": RANK, "target_modules": list(ALL_LINEAR), "slots": SLOTS,
            "adapter_cache_bytes": EngineConfig().adapter_cache_bytes,
            "adapter_cache_prefault": EngineConfig().adapter_cache_prefault, "max_num_batched_tokens": 512,
            "cuda_graphs": device.type == "cuda" and CUDA_GRAPHS,
        },
        "sizes": sizes(loaded, dtype), "machine_rates": rates,
        "notes": [
            f"Only {DISTINCT_FILES} distinct adapter weight files were made (make_adapter, seeds 0-{DISTINCT_FILES - 1}, "
            f"{made['weight_file_bytes']} bytes each in float32); adapter i hard-links file i % {DISTINCT_FILES} and has its own "
            'adapter_config.json with an extra "revision": i, so each has its own content hash and is read, hashed, parsed '
            "and copied into a slot like a real one. Adapters 0-7 (the 8-adapter and peft cases) have really distinct weights. "
            "The weight files stay in the OS page cache, so 'reads' measure copying into memory the server owns, hashing and "
            "parsing, not a disk. Measured on this VM: reading a 20 MB file into new memory takes ~55-60 ms inside a process "
            "holding a model and its KV cache, 8 ms in a fresh one (page faults on new memory are slow here); that dominates "
            "reads.",
            "Closed loop: 32 requests in flight; each finished request is replaced by the next until requests_per_run have run. "
            "Each run uses a fresh engine (cold host cache and slot pool); tok_s includes adapter reads (registry.get: "
            "the requests that arrive together, the first 32 and those that replace the ones a step finished, get their "
            "adapters at once, each in a thread, as the server's AsyncEngine does; the registry reads an adapter once "
            "however many ask; the wait is not overlapped with steps) and "
            "slot loads; tok_s_without_reads leaves out registry.get; decode_step_ms: the mean time of the steps that "
            "prefilled nothing (decode_steps of them). Not the engine's start (engine_start_s), which on "
            "CUDA captures every decode graph (graphs_captured_at_start: each batch-size bucket up to 32 rows, with and "
            "without adapters); graphs_captured_while_serving counts those captured later, inside the run's time.",
            "ratio: tok_s over the paired baseline's (a fresh engine without adapters on the same requests, stepped in "
            "lock step with the run: one step of each in turn). In a paired run tok_s = generated / (own step time + "
            "adapter reads), wall_s is that sum, and the baseline's is generated / its own step time.",
            "adapter_bytes_per_step_vs_base: mean distinct adapters in the running batch x one adapter's bytes in a slot "
            "(slot_dtype), over the base model's bytes in the serving dtype: what each decode step streams for LoRA besides "
            "the base weights. A rank-16 all-linear adapter is ~0.6% of a 7B model's bytes; here it is 3.6% (in float32).",
            "targets 'qv': 8 adapters on q_proj and v_proj only (PEFT's default), rank 16.",
            "floor_ratio: baseline steps' time / (that + (adapter_bytes_streamed + 2 x slot_loads x adapter_bytes) / "
            "copy bandwidth + lora_flops / GEMM rate), with machine_rates[0] (measured after the warm-up; [1] at the end, "
            "for drift). adapter_bytes_streamed: every step's distinct adapters' bytes as the slots hold them; lora_flops: "
            "2 per adapter parameter per token through the model. Adapter reads (disk -> host) are not in the floor. "
            "floor_ratio_with_reads adds the least the reads must take: distinct adapters x weight_file_bytes (a q/v run: "
            "qv_weight_file_bytes) at "
            "machine_rates[0]'s sha256_bytes_per_s (one thread's; each read hashes its file as one stream), over the "
            "run's threads (reads run side by side); re-reads after host evictions would add more.",
            f"lora_share: the served LoRA calls' share of step time under torch's profiler, {PROFILED_STEPS} steps of a "
            "full decode batch with the run's first 32 adapters (a separate untimed engine); ops_per_lora_call: the "
            "top-level torch ops each call dispatches (with CUDA graphs a replayed step runs no Python: no calls are "
            "seen). On CUDA also lora_kernel_share: the LoRA kernels' time (by name) against all the profiled steps "
            "launched (a call's CPU time there is launch time), the kernel time "
            "per step (step_kernel_ms, every kernel and copy the profiler saw), launches per step and the top kernels; "
            "baseline_profile: the same for the engine without adapters. host_top: cProfile over as many more steps, "
            "the functions with the most time of their own per step (a wait for the device shows in the op that syncs).",
            "Slots hold slot_pool.slot_dtype: the serving dtype on CUDA; on CPU bfloat16 for bfloat16 serving where the C "
            "kernel is built (kernels/lora/native_cpu.py), else float32 (slot_dtype in each run); the peft model is "
            "entirely in the serving dtype, adapters included.",
        ],
        "adapter_creation": made, "baseline_profile": base_profile, "runs": results, "peft": peft, "goals": goals,
    }
    model = "" if args.model == "smollm2" else f"_{args.model}"
    where = f"cpu_{cpu_kind()}" if device.type == "cpu" else device.type + ("_eager" if args.eager else "")
    write_result(f"lora_serving_{where}{model}_{args.dtype}" + ("_quick" if args.quick else ""), result, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    base = statistics.mean(r["baseline_tok_s"] for r in result["runs"])
    runs = [r for r in result["runs"] if r["targets"] == "all"]
    for pop, marker in (("uniform", "o"), ("zipf", "s")):
        rs = [r for r in runs if r["popularity"] == pop or r["adapters"] == 1]
        if any(r["popularity"] == pop for r in rs):
            a.plot([r["adapters"] for r in rs], [r["tok_s"] for r in rs], marker=marker, label=f"tandem, {pop}")
            b.plot([r["adapters"] for r in rs], [r["ratio"] for r in rs], marker=marker, label=f"tandem, {pop}")
    for pop, color in (("uniform", "gray"), ("zipf", "silver")):
        rs = [r for r in runs if r["popularity"] == pop or r["adapters"] == 1]
        if any(r["popularity"] == pop for r in rs):
            b.plot([r["adapters"] for r in rs], [r["floor_ratio"] for r in rs], marker="x", linestyle="--",
                   color=color, label=f"floor (bytes + FLOPs), {pop}")
    for r in result["runs"]:
        if r["targets"] == "qv":
            label = "tandem, q/v-only adapters (PEFT default)"
            a.plot([r["adapters"]], [r["tok_s"]], marker="^", linestyle="", color="purple", label=label)
            b.plot([r["adapters"]], [r["ratio"]], marker="^", linestyle="", color="purple", label=label)
    a.axhline(base, color="k", linestyle="--", label="tandem, no adapters (mean)")
    if result["peft"] is not None:
        a.axhline(result["peft"]["tok_s"], color="r", linestyle=":", label="peft mixed batch, 8 adapters")
    a.set_xscale("log", base=2)
    a.set_xlabel("distinct adapters")
    a.set_ylabel("generated tokens/s")
    a.set_ylim(bottom=0)
    w = result["workload"]
    a.set_title(f"{result['model']}, {result['dtype']}, {w['concurrency']} concurrent, rank {w['rank']}, {w['slots']} slots", fontsize=9)
    a.legend(fontsize=8)
    b.axhline(GOALS["8_adapters_vs_base"], color="g", linestyle=":", label="goal, 8 adapters")
    b.axhline(GOALS["2048_zipf_adapters_vs_base"], color="orange", linestyle=":", label="goal, 2048 adapters (zipf)")
    b.set_xscale("log", base=2)
    b.set_xlabel("distinct adapters")
    b.set_ylabel("throughput / no-adapter baseline")
    b.set_ylim(0, 1.2)
    b.set_title("ratio to the paired baseline (steps alternating)", fontsize=9)
    b.legend(fontsize=8)
    counts = sorted({r["adapters"] for r in result["runs"]})
    for ax in (a, b):
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
    fig.suptitle(f"{result['machine']['cpu']} · {result['machine']['commit'][:12]} · {result['machine']['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
