"""It learns: fine-tune SmolLM2-135M-Instruct through the gRPC API on the record-to-JSON task
(bench/synthetic_task.py) and compare exact-match accuracy on held-out records before and
after. The goal (issue 4): at least +40 points, training in at most 10 minutes on CPU.

Starts `tandem serve` on the embedded model (its own process, as a user would), writes the
training file into the server's data directory, evaluates the base model, runs one
fine-tuning job (CreateJob, WatchJob), evaluates the published adapter, and writes
bench/results/finetune_learns.json and a PNG (loss per step; accuracy before/after).

    .venv/bin/python bench/finetune_learns.py              # the full run
    .venv/bin/python bench/finetune_learns.py --quick      # a smoke run (fewer steps and eval records)
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import machine_info, write_result  # noqa: E402
from bench.synthetic_task import EVAL_SEED, TRAIN_SEED, exact_match, make_examples, to_messages, write_jsonl  # noqa: E402
from tandem.client import AsyncTandemClient, TandemClient  # noqa: E402

ADAPTER = "record-to-json"


def start_server(root: Path, threads: int) -> tuple[subprocess.Popen, str]:
    log = root / "server.log"
    args = [
        sys.executable, "-m", "tandem.server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0",
        "--adapters-dir", str(root / "adapters"), "--data-dir", str(root / "data"), "--max-lora-rank", "16",
        "--max-num-batched-tokens", "1024", "--num-threads", str(threads),
    ]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "listening":
                target = f"127.0.0.1:{json.loads(line)['port']}"
                with TandemClient(target, max_retries=0) as client:
                    while client.health("tandem.v1.FineTuningService") != "SERVING":
                        assert process.poll() is None, log.read_text()[-2000:]
                        time.sleep(0.2)
                return process, target
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


async def accuracy(target: str, examples: list[dict], adapter: str) -> tuple[float, list[str]]:
    """Exact-match share over examples (greedy, chat template), all requests in flight at once."""
    async with AsyncTandemClient(target, timeout=600) as client:
        answers = await asyncio.gather(
            *(
                client.generate(messages=to_messages(e)["messages"][:1], adapter=adapter, max_new_tokens=64)
                for e in examples
            )
        )
    texts = [a.text for a in answers]
    return sum(exact_match(t, e) for t, e in zip(texts, examples)) / len(examples), texts


def train(target: str, hyperparameters: dict, lora: dict) -> tuple[dict, list[dict]]:
    """Run the job to its end; returns the final job and one record per progress event."""
    with TandemClient(target, timeout=60) as client:
        job = client.create_finetune_job(ADAPTER, training_file="train.jsonl", lora=lora, hyperparameters=hyperparameters)
        events = []
        for job in client.watch_finetune_job(job.id):
            if job.train_loss is not None and (not events or events[-1]["step"] != job.step):
                events.append({"step": job.step, "train_loss": job.train_loss, "eval_loss": job.eval_loss, "t": time.time()})
                print(f"  step {job.step}/{job.total_steps}  loss {job.train_loss:.4f}  {job.tokens_per_second:.0f} tokens/s", flush=True)
    return job.__dict__ | {"error": job.error and job.error.__dict__}, events


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [e["step"] for e in result["events"]]
    left.plot(steps, [e["train_loss"] for e in result["events"]], label="train loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("mean token loss")
    left.set_title(f"training ({result['train_seconds']:.0f} s)")
    left.legend()
    right.bar(["base", "fine-tuned"], [100 * result["base_accuracy"], 100 * result["tuned_accuracy"]])
    right.set_ylabel("exact match, % of held-out records")
    right.set_ylim(0, 100)
    right.set_title(f"+{100 * result['gain']:.0f} points (goal +40)")
    fig.suptitle(f"record-to-JSON on SmolLM2-135M-Instruct, {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 20 eval records")
    parser.add_argument("--train-records", type=int, default=2000)
    parser.add_argument("--eval-records", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--tokens-per-step", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.max_steps, args.eval_records = 10, 20
    hyperparameters = {
        "learning_rate": args.learning_rate, "max_steps": args.max_steps, "tokens_per_step": args.tokens_per_step,
        "warmup_steps": max(1, args.max_steps // 20), "lr_scheduler": "linear", "checkpoint_interval": 50, "seed": 0,
    }
    lora = {"r": args.r, "lora_alpha": 2 * args.r}
    held_out = make_examples(args.eval_records, EVAL_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "adapters").mkdir()
        (root / "data").mkdir()
        write_jsonl(root / "data" / "train.jsonl", [to_messages(e) for e in make_examples(args.train_records, TRAIN_SEED)])
        process, target = start_server(root, args.threads)
        try:
            base, base_texts = asyncio.run(accuracy(target, held_out, ""))
            print(f"base model: {100 * base:.1f}% exact match on {len(held_out)} held-out records", flush=True)
            started = time.time()
            job, events = train(target, hyperparameters, lora)
            train_seconds = time.time() - started
            tuned, tuned_texts = asyncio.run(accuracy(target, held_out, ADAPTER))
        finally:
            process.terminate()
            process.wait(60)
    print(f"fine-tuned: {100 * tuned:.1f}% exact match; {job['status']} in {train_seconds:.0f} s")
    result = {
        "benchmark": "finetune_learns",
        "machine": machine_info() | {"server_threads": args.threads},
        "task": "record-to-JSON (bench/synthetic_task.py), messages format, loss on the assistant turn",
        "train_records": args.train_records,
        "eval_records": len(held_out),
        "hyperparameters": hyperparameters,
        "lora": lora | {"target_modules": "all seven projections"},
        "base_accuracy": base,
        "tuned_accuracy": tuned,
        "gain": tuned - base,
        "goal": {"gain": 0.40, "train_seconds": 600},
        "train_seconds": train_seconds,
        "job": job,
        "events": [e | {"t": e["t"] - started} for e in events],
        "samples": [
            {"prompt": e["prompt"], "expected": e["completion"], "base": b, "tuned": t}
            for e, b, t in list(zip(held_out, base_texts, tuned_texts))[:5]
        ],
    }
    write_result("finetune_learns" + ("_quick" if args.quick else ""), result, plot)


if __name__ == "__main__":
    main()
