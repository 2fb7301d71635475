"""What a fine-tuning job's parsed dataset holds in memory while it waits and trains, and the
peak of parsing it, per token and as a multiple of the file: every queued job holds its own
(server/finetune/jobs.py), so these set how many fit (--max-active-jobs).

A synthetic file of prompt/completion and text lines is parsed with SmolLM2's tokenizer as a
CreateJob parses it; Python's allocations are traced (tracemalloc: the tokenizer's Rust side
is not, its Python lists are).

    .venv/bin/python bench/dataset_memory.py        # ~30 s on 2 cores
"""

import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.finetune.dataset import parse_dataset  # noqa: E402
from tandem.server.model.loader import default_model_path  # noqa: E402

LINES = 15_000  # of each format
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def dataset() -> bytes:
    rows = [{"prompt": " ".join(WORDS[i % 7 :] * 3) + f" {i}:", "completion": " ".join(WORDS[: 3 + i % 11] * 4)} for i in range(LINES)]
    rows += [{"text": " ".join(WORDS[i % 5 :] * 8) + f" {i}"} for i in range(LINES)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def main() -> None:
    from transformers import AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    data = dataset()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    began = time.perf_counter()
    examples = parse_dataset(data, tokenizer, 512)
    seconds = time.perf_counter() - began
    held, peak = (m - start for m in tracemalloc.get_traced_memory())
    tracemalloc.stop()
    tokens = sum(e.num_tokens for e in examples)
    result = {
        "benchmark": "dataset_memory",
        "machine": machine_info(),
        "file_bytes": len(data),
        "examples": len(examples),
        "tokens": tokens,
        "held_bytes": held,
        "held_bytes_per_token": held / tokens,
        "peak_bytes": peak,
        "peak_over_file": peak / len(data),
        "parse_seconds_traced": seconds,
    }
    print("| file | tokens | held | held per token | parse peak | peak / file |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| {len(data) / 1e6:.1f} MB | {tokens} | {held / 1e6:.1f} MB | {held / tokens:.1f} B | {peak / 1e6:.1f} MB | {peak / len(data):.1f}x |")
    write_result("dataset_memory", result)


if __name__ == "__main__":
    main()
