"""A record-to-JSON task that SmolLM2-135M-Instruct fails and a LoRA learns in minutes.

Fine-tuning has to prove it learns: train on this task through the server, then compare
exact-match accuracy on a held-out split before and after. Each example turns 3 to 5 fields
drawn from a fixed set into the JSON object a program would expect, keys in the given order,
integers left as integers:

    prompt:     Convert to JSON: name=Mila; age=34; city=Oslo; pet=cat
    completion: {"name": "Mila", "age": 34, "city": "Oslo", "pet": "cat"}

The base model scores 0/30 exact matches on the eval split (greedy, chat template, measured
through transformers on CPU), and 1/30 even ignoring layout: it pretty-prints, and invents
fields such as "id": 1234567890. So +40 points measures what the adapter learned.

The prompt ends with a newline: in the prompt/completion format nothing else tells the model
that the prompt is over ("age=3" could go on as "age=34").

Two more deterministic tasks with exact-match answers (make_sort_examples: sort numbers;
make_reverse_examples: reverse words) make three with the JSON one (TASKS), for training one
adapter per task and a router over them (bench/routing_eval.py).

No server imports, so clients and tests can use it.

    python bench/synthetic_task.py --out DIR --train 2000 --eval 100 --format messages
"""

import argparse
import json
import random
import zlib
from pathlib import Path

FIELDS: dict[str, tuple] = {
    "name": ("Mila", "Omar", "Ines", "Kenji", "Sofia", "Liam", "Ava", "Noah", "Zara", "Tomas", "Yara", "Ivan", "Lena",
             "Ravi", "Elif", "Hugo", "Nora", "Felix", "Maya", "Arjun"),
    "age": tuple(range(18, 80)),
    "city": ("Oslo", "Lima", "Paris", "Tokyo", "Cairo", "Berlin", "Austin", "Seoul", "Lagos", "Quito", "Dublin",
             "Hanoi", "Porto", "Nairobi", "Zurich", "Perth"),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "lizard"),
    "color": ("red", "blue", "green", "amber", "violet", "teal", "black", "white"),
    "job": ("nurse", "pilot", "chef", "teacher", "plumber", "lawyer", "farmer", "artist", "engineer", "baker"),
    "score": tuple(range(0, 101)),
}
MIN_FIELDS, MAX_FIELDS = 3, 5
TRAIN_SEED, EVAL_SEED = 0, 1


def make_examples(n: int, seed: int) -> list[dict]:
    """n distinct examples [{"prompt", "completion"}], the same for the same seed.

    A stable hash of each record gives it a parity, and a seed only draws records of its own
    parity, so an even seed (TRAIN_SEED) and an odd one (EVAL_SEED) never share a record:
    evaluation measures learning, not recall.
    """
    rng = random.Random(seed)
    examples: dict[str, dict] = {}
    while len(examples) < n:
        keys = rng.sample(list(FIELDS), rng.randint(MIN_FIELDS, MAX_FIELDS))
        record = {key: rng.choice(FIELDS[key]) for key in keys}
        prompt = "Convert to JSON: " + "; ".join(f"{key}={value}" for key, value in record.items()) + "\n"
        if zlib.crc32(prompt.encode()) % 2 == seed % 2:
            examples.setdefault(prompt, {"prompt": prompt, "completion": json.dumps(record)})
    return list(examples.values())


WORDS = ("red", "fox", "river", "stone", "quiet", "lamp", "seven", "cloud", "mint", "owl", "paper", "drum",
         "salt", "tiger", "violet", "wheel", "honey", "north", "glass", "maple")


def make_sort_examples(n: int, seed: int) -> list[dict]:
    """A second task: 4 to 6 distinct numbers below 100, sorted ascending, space-separated.

        prompt:     Sort ascending: 42 7 19 3
        completion: 3 7 19 42

    Deterministic and split by prompt parity like make_examples."""
    rng = random.Random(seed)
    return _distinct(n, seed, lambda: rng.sample(range(100), rng.randint(4, 6)),
                     lambda xs: ("Sort ascending: " + " ".join(map(str, xs)) + "\n", " ".join(map(str, sorted(xs)))))


def make_reverse_examples(n: int, seed: int) -> list[dict]:
    """A third task: 3 to 5 words from WORDS, in reverse order.

        prompt:     Reverse the words: red fox owl
        completion: owl fox red

    Deterministic and split by prompt parity like make_examples."""
    rng = random.Random(seed)
    return _distinct(n, seed, lambda: rng.sample(WORDS, rng.randint(3, 5)),
                     lambda ws: ("Reverse the words: " + " ".join(ws) + "\n", " ".join(reversed(ws))))


def _distinct(n: int, seed: int, draw, render) -> list[dict]:
    """n distinct examples of render(draw()), only those whose prompt's parity is the seed's."""
    examples: dict[str, dict] = {}
    while len(examples) < n:
        prompt, completion = render(draw())
        if zlib.crc32(prompt.encode()) % 2 == seed % 2:
            examples.setdefault(prompt, {"prompt": prompt, "completion": completion})
    return list(examples.values())


# Every task: name -> example maker (n, seed). Each scores by exact_match.
TASKS = {"json": make_examples, "sort": make_sort_examples, "reverse": make_reverse_examples}


def to_messages(example: dict) -> dict:
    """The example as a chat: the prompt from the user, the JSON from the assistant."""
    return {
        "messages": [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
    }


def exact_match(prediction: str, example: dict) -> bool:
    """Whether the model's answer is exactly the expected JSON (surrounding whitespace aside)."""
    return prediction.strip() == example["completion"]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--format", choices=("messages", "prompt"), default="messages")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    convert = to_messages if args.format == "messages" else dict
    for name, n, seed in (("train", args.train, TRAIN_SEED), ("eval", args.eval, EVAL_SEED)):
        write_jsonl(args.out / f"{name}.jsonl", [convert(example) for example in make_examples(n, seed)])
        print(f"wrote {n} {args.format} examples to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
