"""Does a trained router earn its keep? Three synthetic tasks (bench/synthetic_task.py: record
to JSON, sort numbers, reverse words), one adapter per task trained through Tandem's trainer,
a router's gates trained over them, then exact-match accuracy on held-out examples of the
base model, of every adapter on every task, of the uniform average of the adapters (a router
with zero gates mixing all three equally) and of the trained router, plus composite prompts
that ask for two tasks at once (the answers on two lines; scored per answer line).

Goals (issue 10): the router reaches at least 95% of the matching adapter's accuracy on each
task, and beats every single adapter on the composite prompts.

Everything runs in-process on one Engine (time-sliced training, greedy decoding through the
scheduler, chat template as the server applies it), in a temporary adapters directory.

    .venv/bin/python bench/routing_eval.py [--steps 30] [--gate-steps 30] [--eval 30] [--quick]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lora_serving import load  # noqa: E402
from bench.report import machine_info, write_result  # noqa: E402
from bench.synthetic_task import EVAL_SEED, TASKS, TRAIN_SEED, exact_match, to_messages  # noqa: E402
from tandem.server.adapters.peft_format import peft_config  # noqa: E402
from tandem.server.adapters.router_format import router_config, router_files  # noqa: E402
from tandem.server.config import EngineConfig  # noqa: E402
from tandem.server.engine.chat import render_chat  # noqa: E402
from tandem.server.engine.llm_engine import Engine  # noqa: E402
from tandem.server.engine.sampling_params import SamplingParams  # noqa: E402
from tandem.server.finetune.dataset import parse_dataset  # noqa: E402
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter  # noqa: E402
from tandem.server.finetune.trainable_gates import RouterSpec, TrainableGates  # noqa: E402
from tandem.server.finetune.trainer import Hyperparameters, Trainer  # noqa: E402
from tandem.server.model.loader import LoadedModel, build_from_hf, default_model_path, eos_token_ids  # noqa: E402
from tandem.server.model.lora_targets import group_linears  # noqa: E402

RANK, MAX_NEW_TOKENS = 16, 64
GOALS = {"router_vs_matching_adapter": 0.95}


def load_quick() -> LoadedModel:
    """The tests' tiny random Llama with SmolLM2's tokenizer (the tasks need its chat template)."""
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_hf_model

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    hf = make_tiny_hf_model(tokenizer)
    return LoadedModel(build_from_hf(hf, torch.float32, torch.device("cpu")), tokenizer, "tiny random", "llama", eos_token_ids(hf, tokenizer))


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
    engine.registry.publish(name, config, adapter.peft_tensors())
    return time.perf_counter() - start


def train_router(engine: Engine, rows: list[dict], steps: int) -> float:
    """Train a top-2 router's gates over the task adapters on task-labelled rows; seconds."""
    start = time.perf_counter()
    hp = Hyperparameters(learning_rate=5e-3, max_steps=steps, tokens_per_step=1024, seed=0)
    examples = parse_dataset("\n".join(json.dumps(r) for r in rows), engine.tokenizer, 512)
    experts = [engine.registry.get(t) for t in TASKS]
    gates = TrainableGates(engine.runner.model, experts, RANK, RouterSpec(tuple(TASKS), top_k=2))
    for _ in Trainer(gates, hp, examples, [], engine.config.finetune_micro_batch_tokens).run(engine):
        pass
    engine.registry.publish_router("router", gates.files())
    return time.perf_counter() - start


def publish_uniform(engine: Engine) -> None:
    """A router with zero gates over all three adapters: each token mixes them 1/3 each."""
    gates = {key: torch.zeros(len(TASKS), linear.in_features) for key, linear in group_linears(engine.runner.model).items()}
    engine.registry.publish_router("uniform", router_files(router_config(list(TASKS), top_k=len(TASKS)), gates))


def answers(engine: Engine, prompts: list[str], adapter: str | None) -> list[str]:
    """Greedy answers to user messages, all requests in flight at once."""
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    lora = None if adapter is None else engine.registry.get(adapter)
    texts: dict[str, str] = {}
    for i, prompt in enumerate(prompts):
        text = render_chat(engine.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        engine.add_request(f"{adapter}-{i}", engine.tokenizer(text, add_special_tokens=False).input_ids, params, lora)
        texts[f"{adapter}-{i}"] = ""
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] += out.text
    return [texts[f"{adapter}-{i}"] for i in range(len(prompts))]


def composite(held_out: dict[str, list[dict]], n: int) -> list[dict]:
    """Prompts asking for two different tasks, answers expected on two lines, in order."""
    rng = random.Random(EVAL_SEED)
    names = list(TASKS)
    out = []
    for i in range(n):
        first, second = rng.sample(names, 2)
        a, b = held_out[first][i % len(held_out[first])], held_out[second][(i + 1) % len(held_out[second])]
        out.append({"prompt": a["prompt"] + b["prompt"], "parts": [a["completion"], b["completion"]]})
    return out


def composite_score(text: str, example: dict) -> float:
    """The share of the expected answers that appear as whole lines of the answer."""
    lines = {line.strip() for line in text.strip().splitlines()}
    return sum(part in lines for part in example["parts"]) / len(example["parts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=600, help="training examples per task")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per task adapter")
    parser.add_argument("--gate-steps", type=int, default=30)
    parser.add_argument("--eval", type=int, default=30, help="held-out examples per task (and composite prompts)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, a few steps (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.train, args.steps, args.gate_steps, args.eval = 40, 2, 2, 4
    loaded = load_quick() if args.quick else load("smollm2", torch.float32, torch.device("cpu"))[0]
    held_out = {name: make(args.eval, EVAL_SEED) for name, make in TASKS.items()}
    train_rows = {name: [to_messages(e) for e in make(args.train, TRAIN_SEED)] for name, make in TASKS.items()}
    mixed = [{**row, "task": name} for name, rows in train_rows.items() for row in rows]
    random.Random(0).shuffle(mixed)
    result: dict = {"benchmark": "routing_eval", "machine": machine_info(), "model": loaded.name, "args": vars(args), "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="tandem-routing-eval-") as tmp:
        engine = Engine(loaded, EngineConfig(
            adapters_dir=tmp, max_lora_rank=RANK, max_loras=len(TASKS) + 1, max_num_seqs=64, max_num_batched_tokens=1024,
        ))
        for name, rows in train_rows.items():
            result["seconds"][f"train_{name}"] = train_adapter(engine, name, rows, args.steps)
            print(f"trained {name} in {result['seconds'][f'train_{name}']:.0f}s", flush=True)
        publish_uniform(engine)
        result["seconds"]["train_router"] = train_router(engine, mixed, args.gate_steps)
        print(f"trained the router in {result['seconds']['train_router']:.0f}s", flush=True)
        mixes = composite(held_out, args.eval)
        accuracy: dict[str, dict[str, float]] = {}
        for config in [None, *TASKS, "uniform", "router"]:
            label = config or "base"
            accuracy[label] = {}
            for task, examples in held_out.items():
                texts = answers(engine, [e["prompt"] for e in examples], config)
                accuracy[label][task] = sum(exact_match(t, e) for t, e in zip(texts, examples)) / len(examples)
            texts = answers(engine, [m["prompt"] for m in mixes], config)
            accuracy[label]["composite"] = sum(composite_score(t, m) for t, m in zip(texts, mixes)) / len(mixes)
            print(f"{label:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in accuracy[label].items()), flush=True)
    ratios = {task: accuracy["router"][task] / accuracy[task][task] if accuracy[task][task] else None for task in TASKS}
    best_single_composite = max(accuracy[t]["composite"] for t in TASKS)
    result.update(
        accuracy=accuracy, router_vs_matching_adapter=ratios,
        router_beats_every_adapter_on_composite=accuracy["router"]["composite"] > best_single_composite,
        goals=GOALS,
        meets_goals=all(r is not None and r >= GOALS["router_vs_matching_adapter"] for r in ratios.values())
        and accuracy["router"]["composite"] > best_single_composite,
    )
    print(f"{'':8s} " + "  ".join(f"{k:>9s}" for k in [*TASKS, "composite"]))
    for label, row in accuracy.items():
        print(f"{label:8s} " + "  ".join(f"{row[k]:9.2f}" for k in [*TASKS, "composite"]))
    print("router / matching adapter: " + ", ".join(f"{t} {r if r is None else round(r, 3)}" for t, r in ratios.items()))
    write_result("routing_eval" + ("_quick" if args.quick else ""), result, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = result["accuracy"]
    columns = [*TASKS, "composite"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(accuracy)
    for i, (label, row) in enumerate(accuracy.items()):
        ax.bar([c + i * width for c in range(len(columns))], [row[k] for k in columns], width, label=label)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    ax.set_ylabel("exact match (composite: answer lines found)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{result['model']}: task adapters, their uniform average and a trained router", fontsize=9)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
