"""Fine-tuning throughput on SmolLM2: Tandem's training path against `peft` + AdamW, in one run.

The same adapter (rank 16, lora_alpha 32, all seven linear projections, no dropout) trained
on the same synthetic data: random token ids, every sequence exactly 128 or 512 tokens,
loss on every token (labels = input_ids), 8 x 128 or 2 x 512 tokens per optimizer step.

- Tandem: an Engine built from the transformers model (float32, bfloat16), a TrainableAdapter
  and Trainer.run driven to the end of its plan, i.e. the path a fine-tuning job takes.
  Micro-batches of max_num_batched_tokens: 1024 (one per step) and the default 512 (two).
- peft: get_peft_model on the transformers model, torch.optim.AdamW over the LoRA
  parameters, loss through the model's labels, in float32 and under bfloat16 autocast;
  gradient clipping at the Trainer's max_grad_norm, as Trainer does.

Every configuration runs in its own process (loads the model, warms up, trains the measured
steps), so peak memory is per configuration: the high-water RSS above the RSS once the model
is loaded and built (VmHWM reset through /proc/self/clear_refs). Tandem and peft of a shape
and dtype run back to back; with --rounds N every configuration runs N times, the order
reversed each round, and each ratio is also taken within a round. One more pair of processes
profiles a step of each (torch.profiler, CPU) in the engine's auto dtype and splits its time
by where it is spent: LoRA, attention, base linears, lm_head + loss, norms, optimizer.

    .venv/bin/python bench/finetune.py [--quick] [--rounds N] [--steps N] [--threads 2] [--no-profile]
"""

import argparse
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from tandem.server.config import DTYPES, EngineConfig  # noqa: E402
from tandem.server.engine.llm_engine import Engine  # noqa: E402
from tandem.server.finetune.dataset import TrainingExample  # noqa: E402
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter  # noqa: E402
from tandem.server.finetune.trainer import Hyperparameters, Trainer, plan_steps  # noqa: E402
from tandem.server.model.loader import LoadedModel, build_from_hf, default_model_path, eos_token_ids  # noqa: E402
from tandem.server.model.lora_targets import TARGETS  # noqa: E402

RANK, ALPHA = 16, 32.0
# sequence length -> sequences per optimizer step (~1024 tokens a step).
SHAPES = {128: 8, 512: 2}
GOAL = 1.5
LEARNING_RATE, MAX_GRAD_NORM = 2e-4, 1.0
# Training uses no KV cache; the engine's default 1 GiB would only inflate every RSS.
KV_CACHE_BYTES = 64 << 20
DEFAULT_MICRO_BATCH = EngineConfig().max_num_batched_tokens
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Case:
    """One configuration, run in its own process. micro_batch: Tandem's max_num_batched_tokens
    (None for peft, which runs a step as one batch). profile: profile one step instead of timing."""

    system: str
    dtype: str
    seq_len: int
    micro_batch: int | None = None
    warmup: int = 1
    steps: int = 3
    threads: int = 2
    profile: bool = False

    @property
    def batch(self) -> int:
        return SHAPES[self.seq_len]

    @property
    def label(self) -> str:
        precision = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        if self.system == "peft":
            precision = "fp32" if self.dtype == "float32" else "bf16 autocast"
        micro = "" if self.micro_batch is None else f" mb{self.micro_batch}"
        return f"{self.system} {precision}{micro} {self.batch}x{self.seq_len}"


def cases(warmup: int, steps: int, threads: int) -> list[Case]:
    """Every timed configuration, grouped so that Tandem and peft of a shape and dtype run side by side."""
    out = []
    for seq_len in SHAPES:
        for dtype in ("float32", "bfloat16"):
            out.append(Case("tandem", dtype, seq_len, seq_len * SHAPES[seq_len], warmup, steps, threads))
            out.append(Case("peft", dtype, seq_len, None, warmup, steps, threads))
            out.append(Case("tandem", dtype, seq_len, DEFAULT_MICRO_BATCH, warmup, steps, threads))
    return out


# ---- worker side: one configuration in this process --------------------------------------


def load_gguf():
    """The embedded SmolLM2 GGUF through transformers, float32 (de-quantizing takes ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
    return hf, tok


def stage_model(directory: Path) -> str:
    """Write the GGUF's float32 weights, config and tokenizer once as safetensors, so each of the
    many worker processes loads in ~2 s instead of de-quantizing again; returns the model's name."""
    from safetensors.torch import save_model

    hf, tok = load_gguf()
    save_model(hf, str(directory / "model.safetensors"))
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(str(directory))
    return default_model_path().stem


def load_staged(directory: Path):
    """The staged model as a transformers model (float32, sdpa attention) and its tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    # save_model keeps one name of tied tensors (lm_head.weight for the tied embedding).
    if unexpected or any(not _is_tied(hf, key) for key in missing):
        raise RuntimeError(f"staged model does not match: missing {missing}, unexpected {unexpected}")
    return hf.eval(), AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _is_tied(hf, key: str) -> bool:
    return key == "model.embed_tokens.weight" and hf.lm_head.weight is hf.model.embed_tokens.weight


def synthetic_examples(vocab: int, seq_len: int, count: int, seed: int = 0) -> list[TrainingExample]:
    """count random sequences of exactly seq_len tokens, loss on every token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, seq_len), generator=g).tolist()
    return [TrainingExample(tuple(row), tuple(row)) for row in ids]


def hyperparameters(case: Case, max_steps: int) -> Hyperparameters:
    return Hyperparameters(
        learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, tokens_per_step=case.batch * case.seq_len,
        max_steps=max_steps, seed=0,
    )


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the loaded RSS is what is held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Fallback peak RSS where VmHWM cannot be reset: a thread sampling VmRSS every 5 ms."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def build_tandem(hf, tok, case: Case):
    """An engine around our own model built from hf (as make_engine does), and a fresh adapter."""
    model = build_from_hf(hf, DTYPES[case.dtype], torch.device("cpu"))
    loaded = LoadedModel(model, tok, "SmolLM2", hf.config.model_type, eos_token_ids(hf, tok))
    engine = Engine(loaded, EngineConfig(max_num_batched_tokens=case.micro_batch, kv_cache_bytes=KV_CACHE_BYTES))
    adapter = TrainableAdapter(engine.runner.model, LoRASpec(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), seed=0)
    return engine, adapter


def tandem_steps(engine: Engine, trainer: Trainer):
    """(tokens, loss) of each optimizer step of trainer's plan, in order."""
    for report in trainer.run(engine):
        if report is not None:
            yield report.tokens, report.train_loss


def build_peft(hf):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
    model = get_peft_model(hf, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return model, params, optimizer


def peft_steps(model, params, optimizer, examples: list[TrainingExample], plan: list[list[int]], dtype: str):
    """(tokens, loss) of each optimizer step: the same batches as Trainer's plan."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    for indices in plan:
        ids = torch.tensor([examples[i].input_ids for i in indices])
        with autocast:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        loss.backward()
        peft_optimizer_step(params, optimizer)
        yield ids.numel(), loss.item()


def peft_optimizer_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Clipping and AdamW, as Trainer._optimizer_step does them."""
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class CpuClock:
    """Wall time, the machine's busy CPU ticks (all processes) and this process's own."""

    wall: float
    busy_ticks: int
    own_ticks: int

    @classmethod
    def now(cls) -> "CpuClock":
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
        busy = sum(fields) - fields[3] - fields[4]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return cls(time.perf_counter(), busy, int(own[11]) + int(own[12]))

    def others_share(self, later: "CpuClock") -> float:
        """The fraction of all cores that other processes used between self and later."""
        ticks = (later.wall - self.wall) * os.sysconf("SC_CLK_TCK") * NUM_CPUS
        return max(0.0, (later.busy_ticks - self.busy_ticks) - (later.own_ticks - self.own_ticks)) / max(ticks, 1e-9)


def _num_cpus() -> int:
    with open("/proc/stat") as f:
        return sum(1 for line in f if line.startswith("cpu") and line[3].isdigit())


NUM_CPUS = _num_cpus()
# A step is "disturbed" when other processes took cores this run's threads needed (beyond
# this share of all cores): a thread without a core stalls every parallel op at its barrier.
SLACK = 0.1


def disturbed_above(threads: int) -> float:
    """The share of all cores others may use before a run with this many threads is disturbed."""
    return max(0, NUM_CPUS - threads) / NUM_CPUS + SLACK
# How long a worker waits for quiet cores before it starts anyway (the result shows it), and
# how many steps beyond the measured ones it may run to replace disturbed ones.
QUIET_WAIT_S = 30.0
EXTRA_STEPS = 3


def timed_steps(steps, case: Case) -> tuple[list[dict], list[dict]]:
    """Run the warm-up steps, then steps until case.steps undisturbed ones (at most
    EXTRA_STEPS more); after a disturbed step, wait for quiet cores before the next.

    steps yields (tokens, loss) per optimizer step; returns (warm-up, measured) records with
    each step's seconds and the share of the cores other processes took meanwhile.
    """
    records = []
    clock = CpuClock.now()
    for tokens, loss in steps:
        now = CpuClock.now()
        record = {
            "seconds": now.wall - clock.wall, "cpu_seconds": (now.own_ticks - clock.own_ticks) / os.sysconf("SC_CLK_TCK"),
            "others_share": clock.others_share(now), "tokens": tokens, "loss": loss,
        }
        records.append(record)
        measured = records[case.warmup :]
        clean = sum(r["others_share"] <= disturbed_above(case.threads) for r in measured)
        if clean >= case.steps or len(measured) >= case.steps + EXTRA_STEPS:
            break
        if record["others_share"] > disturbed_above(case.threads):
            record["then_waited_s"] = wait_until_quiet(case.threads, QUIET_WAIT_S)
        clock = CpuClock.now()
    return records[: case.warmup], records[case.warmup :]


def wait_until_quiet(threads: int, limit_s: float, window_s: float = 2.0) -> float:
    """Wait (up to limit_s) until other processes leave this run's threads their cores for two
    windows in a row; returns the seconds waited."""
    start = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - start < limit_s:
        before = CpuClock.now()
        time.sleep(window_s)
        quiet = quiet + 1 if before.others_share(CpuClock.now()) <= disturbed_above(threads) else 0
    return time.perf_counter() - start


def worker(case: Case, model_dir: Path | None) -> dict:
    torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    hf, tok = load_gguf() if model_dir is None else load_staged(model_dir)
    # Enough data for the longest run timed_steps may make.
    max_steps = case.warmup + case.steps + EXTRA_STEPS
    examples = synthetic_examples(hf.config.vocab_size, case.seq_len, case.batch * max_steps)
    hp = hyperparameters(case, max_steps)
    if case.system == "tandem":
        engine, adapter = build_tandem(hf, tok, case)
        # Tandem holds its own (fused) copy of the weights; the transformers model was a staging area.
        del hf
        trainer = Trainer(adapter, hp, examples, [], engine.config.max_num_batched_tokens)
        if case.profile:
            install_tandem_labels()
        steps = tandem_steps(engine, trainer)
    else:
        model, params, optimizer = build_peft(hf)
        if case.profile:
            install_peft_labels(model)
        steps = peft_steps(model, params, optimizer, examples, plan_steps(examples, hp), case.dtype)
    if case.profile:
        return profile_step(steps, case)
    waited = wait_until_quiet(case.threads, QUIET_WAIT_S)
    load_before = os.getloadavg()[0]
    settle_memory()
    loaded_rss = rss_bytes()
    sampler = None if reset_peak_rss() else PeakSampler()
    warmup, measured = timed_steps(steps, case)
    peak = rss_bytes("VmHWM") if sampler is None else sampler.stop()
    undisturbed = [r for r in measured if r["others_share"] <= disturbed_above(case.threads)]
    # Too few undisturbed steps: the least disturbed ones, and the result says so.
    used = undisturbed if len(undisturbed) >= case.steps else sorted(measured, key=lambda r: r["others_share"])[: case.steps]
    seconds = [r["seconds"] for r in used]
    tokens = measured[0]["tokens"]
    return {
        **asdict(case), "label": case.label, "batch": case.batch, "tokens_per_step": tokens,
        "tok_s": tokens / statistics.median(seconds), "tok_s_best": tokens / min(seconds),
        "tok_s_cpu": tokens * case.threads / statistics.median(r["cpu_seconds"] for r in measured),
        "step_s": seconds, "disturbed": len(undisturbed) < case.steps,
        "steps_run": measured, "warmup_steps_run": warmup, "first_step_loss": (warmup + measured)[0]["loss"],
        "loaded_rss_bytes": loaded_rss, "peak_rss_bytes": peak, "peak_above_loaded_bytes": peak - loaded_rss,
        "peak_method": "VmHWM after clear_refs" if sampler is None else "VmRSS sampled every 5 ms",
        "load_average_1m": [load_before, os.getloadavg()[0]], "waited_for_quiet_s": waited,
    }


# ---- the profile: where a Tandem step's time goes -----------------------------------------

# Labels put around the model's parts in the profiling process only (the timed runs are
# untouched); the innermost label of an op is its category, and a backward op takes the
# category of the forward op that made its autograd node (matched by sequence number).
LABEL = "tandem:"


def _labelled(fn, label: str):
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(LABEL + label):
            return fn(*args, **kwargs)

    return wrapper


def install_tandem_labels() -> None:
    import tandem.server.model.llama as llama
    from tandem.kernels.lora.batch import LoRABatch
    from tandem.server.engine.model_runner import ModelRunner
    from tandem.server.model.linear import FusedLinear
    from tandem.server.model.lora_linear import LoRALinear

    methods = [
        (ModelRunner, "execute", "lm_head+loss"),  # what is left of execute: row gathers, cross-entropy
        (ModelRunner, "prepare", "batch prep"),
        (LoRABatch, "build", "batch prep"),
        (llama.LlamaModel, "forward", "embed+residuals"),
        (llama.LlamaModel, "compute_logits", "lm_head+loss"),
        (llama.RMSNorm, "forward", "rmsnorm"),
        (llama.Attention, "forward", "rope+qkv split"),
        (llama.MLP, "forward", "silu*mul"),
        (LoRALinear, "forward", "lora"),  # LoRA's delta and its add; the base GEMM inside is labelled below
        (FusedLinear, "forward", "base linears"),
        (TrainableAdapter, "slot_weights", "adapter slots (masters -> fused)"),
        (Trainer, "_optimizer_step", "optimizer (clip + AdamW)"),
    ]
    for cls, name, label in methods:
        setattr(cls, name, _labelled(getattr(cls, name), label))
    llama.attention = _labelled(llama.attention, "attention")
    llama.Rotary.apply = staticmethod(_labelled(llama.Rotary.apply, "rope+qkv split"))


def install_peft_labels(model) -> None:
    """The same categories on the peft model (HF's Llama, peft's lora.Linear)."""
    import transformers.models.llama.modeling_llama as hf_llama
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    methods = [
        (hf_llama.LlamaForCausalLM, "forward", "lm_head+loss"),  # what is left of it: logits upcast, label shift
        (hf_llama.LlamaModel, "forward", "embed+residuals"),  # also the causal mask and the rotary tables
        (hf_llama.LlamaRMSNorm, "forward", "rmsnorm"),
        (hf_llama.LlamaAttention, "forward", "rope+qkv split"),
        (hf_llama.LlamaMLP, "forward", "silu*mul"),
        (LoraLinear, "forward", "lora"),  # lora_A, lora_B, scaling and the add; its base layer below
    ]
    for cls, name, label in methods:
        setattr(cls, name, _labelled(getattr(cls, name), label))
    hf_llama.apply_rotary_pos_emb = _labelled(hf_llama.apply_rotary_pos_emb, "rope+qkv split")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _labelled(ALL_ATTENTION_FUNCTIONS["sdpa"], "attention")
    causal_lm = model.get_base_model()
    causal_lm.lm_head.forward = _labelled(causal_lm.lm_head.forward, "lm_head+loss")
    causal_lm.loss_function = _labelled(LOSS_MAPPING["ForCausalLM"], "lm_head+loss")
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.base_layer.forward = _labelled(module.base_layer.forward, "base linears")
    globals()["peft_optimizer_step"] = _labelled(peft_optimizer_step, "optimizer (clip + AdamW)")


def categorize(events) -> dict[str, dict]:
    """Self CPU time (us) per category: by phase (forward / backward / other) and by op."""
    evaluate = "autograd::engine::evaluate_function: "

    def scope(e):
        """The innermost label or backward node above e (or e itself)."""
        while e is not None:
            if e.name.startswith(LABEL) or e.name.startswith(evaluate):
                return e
            e = e.cpu_parent
        return None

    # An op that makes no autograd node still records the next sequence number; the op that
    # takes it (makes the node) is the last one to record it, so the latest op wins.
    forward_category = {}
    for e in sorted(events, key=lambda e: e.time_range.start):
        s = scope(e)
        if e.sequence_nr >= 0 and s is not None and s.name.startswith(LABEL):
            forward_category[e.sequence_nr] = s.name[len(LABEL) :]
    out: dict[str, dict] = defaultdict(lambda: {"phases": defaultdict(float), "ops": defaultdict(float), "calls": 0})
    for e in events:
        s = scope(e)
        if s is None:
            category, phase = "unlabelled", "other"
        elif s.name.startswith(LABEL):
            category = s.name[len(LABEL) :]
            phase = "other" if category.startswith(("optimizer", "batch prep", "step")) else "forward"
        else:
            node = s.name[len(evaluate) :]
            category, phase = forward_category.get(s.sequence_nr), "backward"
            if category is None:
                category = "lora" if "LoRADelta" in node else "grad accumulation" if "AccumulateGrad" in node else "unlabelled"
        c = out[category]
        c["phases"][phase] += e.self_cpu_time_total
        c["ops"][e.name] += e.self_cpu_time_total
        c["calls"] += e.name.startswith("aten::")
    return out


def profile_step(steps, case: Case) -> dict:
    """Profile the step after the warm-up ones (after waiting for quiet cores); steps yields
    (tokens, loss) per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(case.warmup):
        next(steps)
    waited = wait_until_quiet(case.threads, QUIET_WAIT_S)
    start = CpuClock.now()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function(LABEL + "step (python outside the labelled parts)"):
            tokens, _ = next(steps)
    end = CpuClock.now()
    wall, others_share = end.wall - start.wall, start.others_share(end)
    events = prof.events()
    by_category = categorize(events)
    total = sum(sum(c["phases"].values()) for c in by_category.values())

    def entry(c: dict) -> dict:
        us = sum(c["phases"].values())
        ops = sorted(c["ops"].items(), key=lambda kv: -kv[1])[:6]
        return {
            "ms": us / 1e3, "share": us / total, "aten_calls": c["calls"],
            **{f"{phase}_ms": t / 1e3 for phase, t in sorted(c["phases"].items())},
            "top_ops": {name: t / 1e3 for name, t in ops},
        }

    categories = {name: entry(c) for name, c in sorted(by_category.items(), key=lambda kv: -sum(kv[1]["phases"].values()))}

    def top(averages, n: int, shapes: bool = False) -> list[dict]:
        ranked = sorted(averages, key=lambda a: -a.self_cpu_time_total)[:n]
        return [
            {"op": a.key, **({"input_shapes": str(a.input_shapes)} if shapes else {}),
             "self_ms": a.self_cpu_time_total / 1e3, "share": a.self_cpu_time_total / total, "calls": a.count}
            for a in ranked
        ]

    return {
        **asdict(case), "label": case.label, "batch": case.batch, "tokens": tokens,
        "step_wall_s_profiled": wall, "others_share": others_share, "waited_for_quiet_s": waited,
        "self_cpu_ms_total": total / 1e3,
        "aten_calls": sum(e.name.startswith("aten::") for e in events),
        "categories": categories, "top_ops_by_self_cpu": top(prof.key_averages(), 20),
        "top_ops_by_self_cpu_and_shape": top(prof.key_averages(group_by_input_shape=True), 20, shapes=True),
    }


# ---- driver side ---------------------------------------------------------------------------


def snapshot_code(directory: Path) -> dict:
    """Copy the packages the workers import into directory, so that every configuration runs
    the same code while the working tree changes under a long run; what the copy differs from
    HEAD in is recorded with the result."""
    import hashlib
    import shutil

    root = Path(__file__).resolve().parents[1]
    packages = ("tandem", "bench")
    for package in packages:
        shutil.copytree(root / package, directory / package, ignore=shutil.ignore_patterns("__pycache__", "results"))

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", *packages)
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "changed_from_head": git("status", "--porcelain", "--", *packages).splitlines(),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def run_case(case: Case, code_dir: Path, model_dir: Path, timeout: float) -> dict:
    """Run case in a fresh interpreter on the code snapshot; its result is the last RESULT line it prints."""
    script = code_dir / "bench" / Path(__file__).name
    cmd = [sys.executable, str(script), "--worker", json.dumps(asdict(case)), "--model-dir", str(model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{case.label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def summarize(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per configuration: medians over rounds. Per shape, dtype and Tandem micro-batch: the ratios to peft."""
    by_label = defaultdict(list)
    for r in runs:
        by_label[r["label"]].append(r)
    summary = []
    for label, rs in by_label.items():
        first = rs[0]
        summary.append({
            "label": label, "system": first["system"], "dtype": first["dtype"], "seq_len": first["seq_len"],
            "batch": first["batch"], "micro_batch": first["micro_batch"],
            "tok_s": statistics.median(r["tok_s"] for r in rs), "tok_s_per_round": [r["tok_s"] for r in rs],
            "tok_s_cpu": statistics.median(r["tok_s_cpu"] for r in rs),
            "step_s_median": statistics.median(s for r in rs for s in r["step_s"]),
            "peak_above_loaded_bytes": statistics.median(r["peak_above_loaded_bytes"] for r in rs),
            "loaded_rss_bytes": statistics.median(r["loaded_rss_bytes"] for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            "first_step_loss": first["first_step_loss"], "disturbed_runs": sum(r["disturbed"] for r in rs),
        })
    ratios = []
    for t in (s for s in summary if s["system"] == "tandem"):
        p = next(s for s in summary if s["system"] == "peft" and (s["dtype"], s["seq_len"]) == (t["dtype"], t["seq_len"]))
        rounds = defaultdict(dict)
        for r in runs:
            if r["label"] in (t["label"], p["label"]):
                rounds[r["round"]][r["system"]] = r["tok_s"]
        paired = [v["tandem"] / v["peft"] for v in rounds.values() if len(v) == 2]
        speedup = t["tok_s"] / p["tok_s"]
        ratios.append({
            "seq_len": t["seq_len"], "batch": t["batch"], "dtype": t["dtype"], "tandem_micro_batch": t["micro_batch"],
            "tandem_tok_s": t["tok_s"], "peft_tok_s": p["tok_s"], "ratio": speedup,
            "ratio_cpu_time": t["tok_s_cpu"] / p["tok_s_cpu"],
            "ratio_paired_per_round": paired, "ratio_paired_median": statistics.median(paired),
            "memory_ratio": t["peak_above_loaded_bytes"] / p["peak_above_loaded_bytes"],
            "loaded_rss_ratio": t["loaded_rss_bytes"] / p["loaded_rss_bytes"],
            "goal_tok_s": GOAL, "meets_speed_goal": speedup >= GOAL,
            "meets_memory_goal": t["peak_above_loaded_bytes"] <= p["peak_above_loaded_bytes"],
        })
    return summary, ratios


def print_table(summary: list[dict], ratios: list[dict]) -> None:
    mib = 2**20
    print(
        f"\n{'configuration':32s} {'tok/s':>7s} {'step s':>7s} {'cpu tok/s':>9s} {'loaded MiB':>10s} {'peak+ MiB':>9s}"
        f"  {'vs peft':>7s} {'paired':>6s} {'cpu-time':>8s} {'mem vs peft':>11s}"
    )
    for s in summary:
        r = next((x for x in ratios if x["tandem_micro_batch"] == s["micro_batch"] and (x["dtype"], x["seq_len"]) == (s["dtype"], s["seq_len"])), None)
        extra = ""
        if r is not None and s["system"] == "tandem":
            extra = f"  {r['ratio']:6.2f}x {r['ratio_paired_median']:5.2f}x {r['ratio_cpu_time']:7.2f}x {r['memory_ratio']:10.2f}x"
        flag = f"  ({s['disturbed_runs']} disturbed)" if s["disturbed_runs"] else ""
        print(
            f"{s['label']:32s} {s['tok_s']:7.1f} {s['step_s_median']:7.2f} {s['tok_s_cpu']:9.1f} {s['loaded_rss_bytes'] / mib:10.0f} "
            f"{s['peak_above_loaded_bytes'] / mib:9.0f}{extra}{flag}"
        )


def print_profile(profile: dict) -> None:
    print(f"\nprofile of one step, {profile['label']} ({profile['self_cpu_ms_total']:.0f} ms self CPU, "
          f"{profile['step_wall_s_profiled']:.2f} s wall under the profiler)")
    for name, c in profile["categories"].items():
        phases = " ".join(f"{k.removesuffix('_ms')} {v:7.1f}" for k, v in c.items() if k.endswith("_ms") and k != "ms")
        ops = ", ".join(f"{op.removeprefix('aten::')} {ms:.0f}" for op, ms in list(c["top_ops"].items())[:4])
        print(f"  {name:34s} {c['ms']:8.1f} ms {100 * c['share']:5.1f}% {c['aten_calls']:6d} ops  {phases:34s} [{ops}]")
    print("  top ops by self CPU time:")
    for op in profile["top_ops_by_self_cpu"][:12]:
        print(f"    {op['op']:60s} {op['self_ms']:8.1f} ms {100 * op['share']:5.1f}%  {op['calls']:6d} calls")
    print("  top ops by self CPU time and input shapes:")
    for op in profile["top_ops_by_self_cpu_and_shape"][:12]:
        print(f"    {op['op']:40s} {op['input_shapes'][:70]:70s} {op['self_ms']:8.1f} ms {op['calls']:5d} calls")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(seq, dtype) for seq in SHAPES for dtype in ("float32", "bfloat16")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = {"peft": "tab:gray", f"tandem mb{DEFAULT_MICRO_BATCH}": "tab:cyan", "tandem mb1024": "tab:blue"}
    width = 0.27
    for gi, (seq, dtype) in enumerate(groups):
        rows = [s for s in result["summary"] if (s["seq_len"], s["dtype"]) == (seq, dtype)]
        peft = next(s for s in rows if s["system"] == "peft")
        ordered = [peft] + sorted((s for s in rows if s["system"] == "tandem"), key=lambda s: s["micro_batch"])
        for k, s in enumerate(ordered):
            key = "peft" if s["system"] == "peft" else f"tandem mb{s['micro_batch']}"
            x = gi + (k - 1) * width
            a.bar(x, s["tok_s"], width, color=colors.get(key, "tab:purple"), label=key if gi == 0 else None)
            text = f"{s['tok_s']:.0f}" + ("*" if s["disturbed_runs"] else "") + ("" if s is peft else f"\n{s['tok_s'] / peft['tok_s']:.2f}x")
            a.text(x, s["tok_s"], text, ha="center", va="bottom", fontsize=7)
        a.hlines(GOAL * peft["tok_s"], gi - 1.6 * width, gi + 1.6 * width, colors="r", linestyles="--",
                 label=f"goal: {GOAL}x peft" if gi == 0 else None)
    names = {"float32": "fp32", "bfloat16": "bf16 (peft: autocast)"}
    a.set_xticks(range(len(groups)), [f"{SHAPES[seq]}x{seq}\n{names[dtype]}" for seq, dtype in groups], fontsize=8)
    a.set_ylabel("trained tokens/s")
    a.margins(y=0.3)
    disturbed = any(r["disturbed_runs"] for r in result["summary"])
    a.set_title(
        f"{result['model']}, LoRA r{RANK} all linear, {result['threads']} thread(s), {result['workload']['rounds']} round(s)"
        + (" (* disturbed: another process took a core)" if disturbed else ""), fontsize=9)
    a.legend(fontsize=8, loc="upper left", ncol=2)
    mib = 2**20
    for gi, (seq, dtype) in enumerate(groups):
        rows = [s for s in result["summary"] if (s["seq_len"], s["dtype"]) == (seq, dtype)]
        ordered = [next(s for s in rows if s["system"] == "peft")] + sorted((s for s in rows if s["system"] == "tandem"), key=lambda s: s["micro_batch"])
        for k, s in enumerate(ordered):
            key = "peft" if s["system"] == "peft" else f"tandem mb{s['micro_batch']}"
            b.bar(gi + (k - 1) * width, s["peak_above_loaded_bytes"] / mib, width, color=colors.get(key, "tab:purple"))
    b.set_xticks(range(len(groups)), [f"{SHAPES[seq]}x{seq}\n{names[dtype]}" for seq, dtype in groups], fontsize=8)
    b.set_ylabel("peak RSS above loaded model (MiB)")
    b.set_title("training memory per process", fontsize=9)
    m = result["machine"]
    fig.suptitle(f"{m['cpu']} · {m['commit'][:12]} · {m['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_profiles(tandem: dict, peft: dict) -> dict:
    """Per category: Tandem's and peft's self CPU ms in the same step shape and dtype."""
    names = list(dict.fromkeys([*tandem["categories"], *peft["categories"]]))
    out = {}
    for name in names:
        t = tandem["categories"].get(name, {}).get("ms", 0.0)
        p = peft["categories"].get(name, {}).get("ms", 0.0)
        out[name] = {"tandem_ms": t, "peft_ms": p, "tandem_minus_peft_ms": t - p}
    return {"label": f"{tandem['label']} vs {peft['label']}", "tandem_total_ms": tandem["self_cpu_ms_total"],
            "peft_total_ms": peft["self_cpu_ms_total"], "categories": out}


def print_comparison(c: dict) -> None:
    print(f"\nwhere the time goes, {c['label']} (self CPU ms of one step)")
    print(f"  {'category':36s} {'tandem':>9s} {'peft':>9s} {'diff':>9s}")
    for name, v in sorted(c["categories"].items(), key=lambda kv: -kv[1]["tandem_ms"]):
        print(f"  {name:36s} {v['tandem_ms']:9.0f} {v['peft_ms']:9.0f} {v['tandem_minus_peft_ms']:+9.0f}")
    print(f"  {'total':36s} {c['tandem_total_ms']:9.0f} {c['peft_total_ms']:9.0f} {c['tandem_total_ms'] - c['peft_total_ms']:+9.0f}")


def matmul_rate(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 20) -> float:
    """FLOP/s of the best of `repeats` [m, k] x [k, n] GEMMs: what a training step's large
    GEMMs (1024 tokens through an MLP projection of SmolLM2) can reach on these threads, by
    the faster of `a @ b` and oneDNN on a weight reordered once (what Tandem's base linears
    run where oneDNN has the dtype): a ceiling must not be below a path the code takes."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    gemms = [lambda: a @ b]
    if torch.backends.mkldnn.is_available() and (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        weight = b.t().contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        gemms.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = math.inf
    for gemm in gemms:
        for _ in range(3):
            gemm()
        for _ in range(repeats):
            start = time.perf_counter()
            gemm()
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def step_flops_per_token(hf, seq_len: int) -> float:
    """FLOPs one trained token costs with a frozen base, whatever the implementation: the
    forward (2 per weight) and the backward to the activations (2 per weight, no weight
    gradient), over every linear and the lm_head, plus causal attention (QK^T and PV, forward
    and twice in backward, over half the sequence on average). LoRA's own FLOPs are < 3% here
    and left out, so this is a lower bound on the work."""
    cfg = hf.config
    weights = sum(p.numel() for name, p in hf.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    if cfg.tie_word_embeddings:
        weights += cfg.vocab_size * cfg.hidden_size
    attention = 3 * 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * seq_len / 2
    return 4 * weights + attention


def compute_floor(hf, threads: int) -> dict:
    """The step-time floor on this machine: tokens/s if every FLOP ran at the measured GEMM rate."""
    torch.set_num_threads(threads)
    out = {"threads": threads, "gemm_shape": [1024, 576, 1536]}
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_rate(dtype)
        name = str(dtype).removeprefix("torch.")
        out[name] = {"gemm_flops_per_s": rate}
        for seq_len in SHAPES:
            flops = step_flops_per_token(hf, seq_len)
            out[name][f"tok_s_ceiling_seq{seq_len}"] = rate / flops
            out[name][f"flops_per_token_seq{seq_len}"] = flops
    return out


def print_floor(floor: dict, summary: list[dict] | None = None) -> None:
    print(f"\nthe floor: measured GEMM rate ({floor['threads']} threads) and what it allows")
    for dtype in ("float32", "bfloat16"):
        f = floor[dtype]
        ceilings = "  ".join(f"seq {s}: <= {f[f'tok_s_ceiling_seq{s}']:.0f} tok/s" for s in SHAPES)
        print(f"  {dtype:9s} {f['gemm_flops_per_s'] / 1e9:7.1f} GFLOP/s   {ceilings}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, help="rounds of every configuration (default 2, quick 1)")
    ap.add_argument("--steps", type=int, help="measured optimizer steps per run (default 3, quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps before timing starts")
    ap.add_argument("--quick", action="store_true", help="one measured step per configuration, a smoke run")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--floor-only", action="store_true", help="measure the floor and add it to this CPU kind's bench/results/finetune_cpu_<kind>.json")
    args = ap.parse_args()
    if args.floor_only:
        path = Path(__file__).resolve().parent / "results" / f"finetune_cpu_{cpu_kind()}.json"
        result = json.loads(path.read_text())
        result["floor"] = compute_floor(load_gguf()[0], args.threads) | {"measured": machine_info()}
        print_floor(result["floor"])
        path.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.worker:
        case = Case(**json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(worker(case, args.model_dir)), flush=True)
        return
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 3)
    info = machine_info()
    auto_dtype = str(EngineConfig(device="cpu").resolve_dtype()).removeprefix("torch.")
    started = time.perf_counter()
    runs, profiles, comparisons = [], [], []
    with tempfile.TemporaryDirectory(prefix="tandem-finetune-bench-") as tmp:
        code_dir, model_dir = Path(tmp) / "code", Path(tmp) / "model"
        model_dir.mkdir()
        code = snapshot_code(code_dir)
        model_name = stage_model(model_dir)
        print(f"staged {model_name} as safetensors in {time.perf_counter() - started:.0f}s", flush=True)
        for rnd in range(rounds):
            order = cases(args.warmup, steps, args.threads)
            for case in order if rnd % 2 == 0 else order[::-1]:
                r = run_case(case, code_dir, model_dir, timeout=1800)
                r["round"] = rnd
                runs.append(r)
                print(
                    f"round {rnd}  {r['label']:32s} {r['tok_s']:7.1f} tok/s  steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s  "
                    f"peak +{r['peak_above_loaded_bytes'] / 2**20:.0f} MiB  loss {r['first_step_loss']:.3f}  "
                    f"others {'/'.join(format(x['others_share'], '.2f') for x in r['steps_run'])}"
                    f"{'  DISTURBED' if r['disturbed'] else ''}  waited {r['waited_for_quiet_s']:.0f}s  [{time.perf_counter() - started:.0f}s]",
                    flush=True,
                )
        summary, ratios = summarize(runs)
        print_table(summary, ratios)
        if not args.no_profile:
            for seq_len in SHAPES:
                pair = [
                    run_case(Case(system, auto_dtype, seq_len, micro, args.warmup, 1, args.threads, profile=True), code_dir, model_dir, 1800)
                    for system, micro in (("tandem", seq_len * SHAPES[seq_len]), ("peft", None))
                ]
                profiles += pair
                print_profile(pair[0])
                comparisons.append(compare_profiles(*pair))
                print_comparison(comparisons[-1])
        floor = compute_floor(load_staged(model_dir)[0], args.threads)
        print_floor(floor)
    result = {
        "machine": info, "code": code, "model": model_name, "threads": args.threads, "engine_auto_dtype_on_this_cpu": auto_dtype,
        "workload": {
            "rank": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS), "lora_dropout": 0.0,
            "shapes": [{"seq_len": s, "batch": b, "tokens_per_step": s * b} for s, b in SHAPES.items()],
            "data": "random token ids in [3, vocab), labels = input_ids (loss on every token but the first)",
            "learning_rate": LEARNING_RATE, "max_grad_norm": MAX_GRAD_NORM, "weight_decay": 0.0,
            "warmup_steps": args.warmup, "measured_steps": steps, "rounds": rounds, "quick": args.quick,
            "tandem_kv_cache_bytes": KV_CACHE_BYTES, "tandem_micro_batches": sorted({c.micro_batch for c in cases(0, 0, 0) if c.micro_batch}),
        },
        "notes": [
            "floor: the best-of-20 rate of a [1024, 576] x [576, 1536] GEMM per dtype on the run's threads (the faster of a @ b and oneDNN on a reordered weight), and the "
            "tokens/s a step could reach if all its FLOPs (4 per frozen weight, forward and backward to the activations, "
            "plus causal attention; LoRA's < 3% left out) ran at that rate: a ceiling for any implementation.",
            "tok_s: tokens of an optimizer step / the median wall time of the measured steps (forward, backward, "
            "clipping, AdamW step; warm-up steps excluded), the median over rounds when there are several; tok_s_mean "
            "in runs: the same over the sum of the step times. Each configuration runs in a fresh process, on a copy of "
            "tandem/ and bench/ taken at the start (see 'code'), so that edits to the tree during the run do "
            "not change what is measured. The GGUF is de-quantized once and staged as float32 safetensors for the workers.",
            "Tandem runs Trainer.run (a fine-tuning job's path) on an Engine built from the same transformers model; "
            "micro_batch is the engine's max_num_batched_tokens, which the job service passes to Trainer as its "
            f"micro-batch: {max(SHAPES) * SHAPES[max(SHAPES)]} = one micro-batch per step, {DEFAULT_MICRO_BATCH} (the "
            "default) = two. Tandem's masters and AdamW are float32 in both dtypes; the base and activations are in the "
            "run's dtype.",
            "peft: get_peft_model on the float32 transformers model (sdpa attention, use_cache=False), AdamW over the "
            "LoRA parameters, clip_grad_norm_ as Trainer does; 'bf16 autocast' runs the forward under "
            "torch.autocast('cpu', dtype=torch.bfloat16) (weights stay float32). Both train on the same batches in the "
            "same order (Trainer's plan); their first-step losses agree (B starts at zero), see first_step_loss.",
            "Memory: peak_above_loaded = VmHWM (reset through /proc/self/clear_refs once the model and the trainable "
            "adapter are built and freed heap is trimmed) minus VmRSS at that point: what training adds (activations, "
            "gradients, optimizer state). loaded_rss: the whole process then (Tandem: its fused weights in the run's "
            f"dtype, the transformers copy dropped, a {KV_CACHE_BYTES >> 20} MiB KV cache instead of the default 1 GiB; "
            "peft: the float32 transformers model).",
            "ratio: Tandem tok_s / peft tok_s of the same shape and dtype; ratio_paired_per_round: the ratio within each "
            "round (the two ran back to back). tok_s_cpu / ratio_cpu_time: the same from the process's own CPU time "
            "per step (x threads), which time-slicing by other processes inflates much less than wall time; with one "
            "thread it is the steadier comparison on a busy machine, with several it counts barrier spinning too.",
            "A shared machine: with as many threads as cores, another busy process stalls every parallel op at its "
            f"barrier (steps 8x slower were seen here). Each worker waits up to {QUIET_WAIT_S:.0f} s for quiet cores "
            "(waited_for_quiet_s), and records for every step the share of all cores other processes used meanwhile "
            f"(/proc/stat minus its own ticks: others_share). A step is disturbed when others_share > "
            f"(cores - threads) / cores + {SLACK} (others took a core a thread needed): the "
            f"worker waits for quiet cores again and runs further steps (up to {EXTRA_STEPS} more) until it has "
            "measured_steps undisturbed ones, and tok_s uses only those; if it cannot, tok_s uses the least disturbed "
            "ones and the run is flagged disturbed.",
            "profiles: one optimizer step after warm-up, Tandem (one micro-batch) and peft in the engine's auto dtype "
            "on this CPU, torch.profiler on CPU with input shapes. The model's parts are wrapped in record_function "
            "labels in the profiling processes only (the timed runs are untouched); an op's category is its innermost "
            "label, a backward op takes the category of the forward op that made its autograd node (sequence number). "
            "'lora': the LoRA autograd function (forward, LoRADeltaBackward) plus the add of its delta (peft: lora_A, "
            "lora_B, scaling, add); 'base linears': the frozen GEMMs (forward, dX in backward; autocast's weight casts "
            "for peft); 'attention': SDPA and the reshapes around it in server/model/attention.py (peft: "
            "sdpa_attention_forward); 'rope+qkv split': the rest of the attention block; 'lm_head+loss': the logits "
            "GEMM, float32 upcast, cross-entropy and the row gathers. Times are self CPU time; Python between ops "
            "counts in the enclosing label's own time. profile_comparison puts the two side by side.",
        ],
        "floor": floor, "runs": runs, "summary": summary, "ratios": ratios, "profile_comparison": comparisons, "profiles": profiles,
        "wall_s": time.perf_counter() - started,
    }
    stem = f"finetune_cpu_{cpu_kind()}" + ("" if args.threads == 2 else f"_threads{args.threads}") + ("_quick" if args.quick else "")
    write_result(stem, result, plot)


if __name__ == "__main__":
    main()
