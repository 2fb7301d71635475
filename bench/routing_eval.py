"""Does a trained router earn its keep? Three synthetic tasks (bench/synthetic_task.py: record
to JSON, sort numbers, reverse words), one adapter per task trained through Tandem's trainer,
a router's gates trained over them, then exact-match accuracy on held-out examples of the
base model, of every adapter on every task, of the uniform average of the adapters (a router
with zero gates mixing all three equally) and of the trained router, plus composite prompts
that ask for two tasks at once (the answers on two lines; scored per answer line). Two
diagnostics: the same gates routing top-1 (router-top1: what the second expert's weight
costs), and on each task the share of generated tokens whose top expert was each adapter.

Goals (issue 10): the router reaches at least 95% of the matching adapter's accuracy on each
task, and beats every single adapter on the composite prompts.

Everything runs in-process on one Engine (time-sliced training, greedy decoding through the
scheduler, chat template as the server applies it). The task adapters come from
bench/task_adapters.py: with --adapters-dir they are trained once and reused (by
bench/algebra_eval.py too), else trained afresh in a temporary directory.

    .venv/bin/python bench/routing_eval.py [--steps 30] [--gate-steps 60] [--gate-lr 1e-2] [--eval 30] [--adapters-dir DIR] [--quick]
"""

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from bench.synthetic_task import EVAL_SEED, TASKS, exact_match  # noqa: E402
from bench.task_adapters import (  # noqa: E402
    RANK, add_arguments, adapters_dir, answers, completions, apply_quick, held_out, load_model, make_engine, task_adapters, train_rows,
)
from tandem.server.adapters.router_format import router_config, router_files  # noqa: E402
from tandem.server.engine.llm_engine import Engine  # noqa: E402
from tandem.server.finetune.dataset import parse_dataset  # noqa: E402
from tandem.server.finetune.trainable_gates import RouterSpec, TrainableGates  # noqa: E402
from tandem.server.finetune.trainer import Hyperparameters, Trainer  # noqa: E402
from tandem.server.model.lora_targets import group_linears  # noqa: E402

GOALS = {"router_vs_matching_adapter": 0.95}


def train_router(engine: Engine, rows: list[dict], steps: int, lr: float) -> tuple[float, list[float]]:
    """Train a top-2 router's gates over the task adapters on task-labelled rows and publish it,
    with a top-1 twin on the same gates (router-top1: how much the second expert costs); seconds,
    and each step's language-model loss."""
    start = time.perf_counter()
    hp = Hyperparameters(learning_rate=lr, max_steps=steps, tokens_per_step=1024, seed=0)
    examples = parse_dataset("\n".join(json.dumps(r) for r in rows), engine.tokenizer, 512)
    experts = [engine.registry.get(t) for t in TASKS]
    gates = TrainableGates(engine.runner.model, experts, RANK, RouterSpec(tuple(TASKS), top_k=2))
    trainer = Trainer(gates, hp, examples, [], engine.config.finetune_micro_batch_tokens)
    losses = [report.train_loss for report in trainer.run(engine) if report is not None]
    engine.registry.publish_router("router", gates.files())
    top1 = router_config(list(TASKS), top_k=1)
    engine.registry.publish_router("router-top1", router_files(top1, {key: g.detach() for key, g in gates.gates().items()}))
    return time.perf_counter() - start, losses


def publish_uniform(engine: Engine) -> None:
    """A router with zero gates over all three adapters: each token mixes them 1/3 each."""
    gates = {key: torch.zeros(len(TASKS), linear.in_features) for key, linear in group_linears(engine.runner.model).items()}
    engine.registry.publish_router("uniform", router_files(router_config(list(TASKS), top_k=len(TASKS)), gates))


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
    add_arguments(parser)
    parser.add_argument("--gate-steps", type=int, default=60, help="optimizer steps of the router's gates")
    parser.add_argument("--gate-lr", type=float, default=1e-2, help="the gates' peak learning rate (linear decay)")
    args = parser.parse_args()
    apply_quick(args)
    if args.quick:
        args.gate_steps = 2
    loaded = load_model(args.quick)
    examples = held_out(args.eval)
    mixed = [{**row, "task": name} for name, rows in train_rows(args.train).items() for row in rows]
    random.Random(0).shuffle(mixed)
    result: dict = {"benchmark": "routing_eval", "machine": machine_info(), "model": loaded.name,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "seconds": {}}
    with adapters_dir(args.adapters_dir) as directory:
        engine = make_engine(loaded, directory, len(TASKS) + 1)
        result["task_adapters"] = task_adapters(engine, args.train, args.steps)
        publish_uniform(engine)
        result["seconds"]["train_router"], result["router_train_loss"] = train_router(engine, mixed, args.gate_steps, args.gate_lr)
        print(f"trained the router in {result['seconds']['train_router']:.0f}s", flush=True)
        mixes = composite(examples, args.eval)
        scores: dict[str, dict[str, float]] = {}
        top_expert_share: dict[str, dict[str, float]] = {}
        for config in [None, *TASKS, "uniform", "router", "router-top1"]:
            label = config or "base"
            scores[label] = {}
            for task, task_examples in examples.items():
                outs = completions(engine, [e["prompt"] for e in task_examples], config)
                scores[label][task] = sum(exact_match(t, e) for (t, _), e in zip(outs, task_examples)) / len(task_examples)
                if config == "router":
                    top = Counter(expert for _, experts in outs for expert in experts)
                    top_expert_share[task] = {e: top[e] / max(1, top.total()) for e in TASKS}
            texts = answers(engine, [m["prompt"] for m in mixes], config)
            scores[label]["composite"] = sum(composite_score(t, m) for t, m in zip(texts, mixes)) / len(mixes)
            print(f"{label:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in scores[label].items()), flush=True)
    ratios = {task: scores["router"][task] / scores[task][task] if scores[task][task] else None for task in TASKS}
    best_single_composite = max(scores[t]["composite"] for t in TASKS)
    result.update(
        accuracy=scores, router_vs_matching_adapter=ratios, router_top_expert_share=top_expert_share,
        router_beats_every_adapter_on_composite=scores["router"]["composite"] > best_single_composite,
        goals=GOALS,
        meets_goals=all(r is not None and r >= GOALS["router_vs_matching_adapter"] for r in ratios.values())
        and scores["router"]["composite"] > best_single_composite,
    )
    print(f"{'':12s} " + "  ".join(f"{k:>9s}" for k in [*TASKS, "composite"]))
    for label, row in scores.items():
        print(f"{label:12s} " + "  ".join(f"{row[k]:9.2f}" for k in [*TASKS, "composite"]))
    for task, share in top_expert_share.items():
        print(f"router on {task}: generated tokens' top expert " + ", ".join(f"{e} {v:.0%}" for e, v in share.items()))
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
