"""The synthetic-task adapters that bench/routing_eval.py and bench/algebra_eval.py evaluate:
one rank-16 all-linear adapter per task of bench/synthetic_task.py (TASKS), trained through
Tandem's trainer on one in-process Engine, and exact-match scoring of any adapter the
engine's registry serves (greedy, chat template as the server applies it).

The adapters live in the engine's adapters directory. Given a persistent one (--adapters-dir),
the adapters are trained once: the directory keeps a record of how (task_adapters.json: model,
training examples, steps, rank, training seconds), and a later run asking for the same reuses
them instead of training again; whatever else a run publishes there (routers, merges,
compressed copies) is written anew each run.
"""

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.lora_serving import load
from bench.synthetic_task import EVAL_SEED, TASKS, TRAIN_SEED, exact_match, to_messages
from tandem.server.adapters.peft_format import peft_config
from tandem.server.config import EngineConfig
from tandem.server.engine.chat import render_chat
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.finetune.dataset import parse_dataset
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter
from tandem.server.finetune.trainer import Hyperparameters, Trainer
from tandem.server.model.loader import LoadedModel, build_from_hf, default_model_path, eos_token_ids

RANK, MAX_NEW_TOKENS = 16, 64
RECORD = "task_adapters.json"
QUICK = {"train": 40, "steps": 2, "eval": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every evaluation over the task adapters takes."""
    parser.add_argument("--train", type=int, default=600, help="training examples per task")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per task adapter")
    parser.add_argument("--eval", type=int, default=30, help="held-out examples per task")
    parser.add_argument("--adapters-dir", type=Path, help="keep the trained task adapters here and reuse them when trained alike "
                        "(default: a temporary directory, trained afresh)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, a few steps (a smoke run)")


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)


def load_model(quick: bool) -> LoadedModel:
    """SmolLM2 in float32 on the CPU, or for --quick the tests' tiny random Llama with SmolLM2's
    tokenizer (the tasks need its chat template)."""
    if not quick:
        return load("smollm2", torch.float32, torch.device("cpu"))[0]
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_hf_model

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    hf = make_tiny_hf_model(tokenizer)
    return LoadedModel(build_from_hf(hf, torch.float32, torch.device("cpu")), tokenizer, "tiny random", "llama", eos_token_ids(hf, tokenizer))


@contextlib.contextmanager
def adapters_dir(path: Path | None) -> Iterator[Path]:
    """path (created if missing), or a temporary directory removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tandem-task-adapters-") as tmp:
        yield Path(tmp)


def make_engine(loaded: LoadedModel, directory: Path, max_loras: int, max_rank: int = RANK) -> Engine:
    return Engine(loaded, EngineConfig(
        adapters_dir=str(directory), max_lora_rank=max_rank, max_loras=max_loras, max_num_seqs=64, max_num_batched_tokens=1024,
    ))


def train_rows(n: int) -> dict[str, list[dict]]:
    """n training chats per task."""
    return {name: [to_messages(e) for e in make(n, TRAIN_SEED)] for name, make in TASKS.items()}


def held_out(n: int) -> dict[str, list[dict]]:
    """n held-out examples per task (disjoint from the training ones)."""
    return {name: make(n, EVAL_SEED) for name, make in TASKS.items()}


def train_adapter(engine: Engine, name: str, rows: list[dict], steps: int) -> float:
    """Train a rank-16 all-linear adapter on rows (messages JSONL) and publish it; seconds."""
    start = time.perf_counter()
    hp = Hyperparameters(learning_rate=1e-3, max_steps=steps, tokens_per_step=1024, warmup_steps=max(1, steps // 20), seed=0)
    examples = parse_dataset("\n".join(json.dumps(r) for r in rows), engine.tokenizer, 512)
    spec = LoRASpec(r=RANK, lora_alpha=2 * RANK)
    adapter = TrainableAdapter(engine.runner.model, spec, seed=0)
    for _ in Trainer(adapter, hp, examples, [], engine.config.finetune_micro_batch_tokens).run(engine):
        pass
    config = peft_config(spec.r, spec.lora_alpha, list(spec.target_modules), False, 0.0, engine.info.name)
    engine.registry.publish(name, config, adapter.peft_tensors(), adapter.a_init_seed)
    return time.perf_counter() - start


def task_adapters(engine: Engine, train: int, steps: int) -> dict:
    """One adapter per task, named for it, in the engine's adapters directory: reused when the
    directory's record says they were trained on this model with these settings, else trained
    now. Returns the record (with "reused")."""
    directory = Path(engine.config.adapters_dir)
    wanted = {"model": engine.info.name, "train": train, "steps": steps, "rank": RANK}
    record_path = directory / RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted and all((directory / t).is_dir() for t in TASKS):
            for task in TASKS:
                engine.registry.load(task)
            print(f"reusing the task adapters in {directory} ({steps} steps on {train} examples each)", flush=True)
            return {**record, "reused": True}
    record_path.unlink(missing_ok=True)
    seconds = {}
    for name, rows in train_rows(train).items():
        seconds[name] = train_adapter(engine, name, rows, steps)
        print(f"trained {name} in {seconds[name]:.0f}s", flush=True)
    record = {**wanted, "train_seconds": seconds}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "reused": False}


def completions(engine: Engine, prompts: list[str], adapter: str | None) -> list[tuple[str, list[str]]]:
    """Greedy answers to user messages, all requests in flight at once, each with the top
    expert of every generated token (a router's; empty for anything else)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    lora = None if adapter is None else engine.registry.get(adapter)
    outs: dict[str, tuple[str, list[str]]] = {}
    for i, prompt in enumerate(prompts):
        text = render_chat(engine.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        engine.add_request(f"{adapter}-{i}", engine.tokenizer(text, add_special_tokens=False).input_ids, params, lora)
        outs[f"{adapter}-{i}"] = ("", [])
    while engine.has_work():
        for out in engine.step():
            text, experts = outs[out.request_id]
            outs[out.request_id] = (text + out.text, experts + (out.top_experts or []))
    return [outs[f"{adapter}-{i}"] for i in range(len(prompts))]


def answers(engine: Engine, prompts: list[str], adapter: str | None) -> list[str]:
    """Greedy answers to user messages, all requests in flight at once."""
    return [text for text, _ in completions(engine, prompts, adapter)]


def accuracy(engine: Engine, examples: list[dict], adapter: str | None) -> float:
    """Exact-match accuracy of the adapter (None: the base model) on examples."""
    texts = answers(engine, [e["prompt"] for e in examples], adapter)
    return sum(exact_match(t, e) for t, e in zip(texts, examples)) / len(examples)
