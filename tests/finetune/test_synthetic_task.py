"""The synthetic record-to-JSON task is deterministic, its eval split is unseen in training, and
its files are valid training data."""

import json
import re

import pytest

from bench import synthetic_task
from bench.synthetic_task import EVAL_SEED, FIELDS, TRAIN_SEED, exact_match, make_examples, to_messages
from tandem.server.finetune.dataset import parse_dataset

PROMPT = re.compile(r"Convert to JSON: (\w+=\w+)(; \w+=\w+){2,4}\n")


def test_examples_are_deterministic_in_the_seed():
    assert make_examples(50, seed=3) == make_examples(50, seed=3)
    assert make_examples(50, seed=3) != make_examples(50, seed=5)


def test_train_and_eval_records_are_disjoint_and_distinct():
    train = [e["prompt"] for e in make_examples(2000, TRAIN_SEED)]
    held_out = [e["prompt"] for e in make_examples(500, EVAL_SEED)]
    assert len(set(train)) == 2000 and len(set(held_out)) == 500
    assert not set(train) & set(held_out)


def test_the_completion_is_the_prompts_record_as_json_in_order_with_ints_kept():
    for example in make_examples(200, seed=0):
        assert PROMPT.fullmatch(example["prompt"])
        fields = [pair.split("=") for pair in example["prompt"].removeprefix("Convert to JSON: ").strip().split("; ")]
        record = json.loads(example["completion"])
        assert [[key, str(value)] for key, value in record.items()] == fields
        assert all(value in FIELDS[key] for key, value in record.items())
        assert example["completion"] == json.dumps(record)


def test_exact_match():
    example = {"prompt": "Convert to JSON: name=Mila; age=34; pet=cat\n", "completion": '{"name": "Mila", "age": 34, "pet": "cat"}'}
    assert exact_match(' {"name": "Mila", "age": 34, "pet": "cat"}\n', example)
    assert not exact_match('{"name": "Mila", "age": "34", "pet": "cat"}', example)
    assert not exact_match('{"age": 34, "name": "Mila", "pet": "cat"}', example)
    assert not exact_match('{"name":"Mila","age":34,"pet":"cat"}', example)


@pytest.mark.parametrize("fmt", ["messages", "prompt"])
def test_the_written_files_are_valid_training_data(tmp_path, monkeypatch, smollm2_tokenizer, fmt):
    argv = ["synthetic_task.py", "--out", str(tmp_path), "--train", "40", "--eval", "10", "--format", fmt]
    monkeypatch.setattr("sys.argv", argv)
    synthetic_task.main()
    train = parse_dataset((tmp_path / "train.jsonl").read_bytes(), smollm2_tokenizer, max_seq_length=128)
    held_out = parse_dataset((tmp_path / "eval.jsonl").read_bytes(), smollm2_tokenizer, max_seq_length=128)
    assert (len(train), len(held_out)) == (40, 10)
    expected = make_examples(40, TRAIN_SEED)[0]
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first == (to_messages(expected) if fmt == "messages" else expected)


@pytest.mark.parametrize("name", ["sort", "reverse"])
def test_the_other_tasks_are_deterministic_disjoint_and_right(name):
    make = synthetic_task.TASKS[name]
    assert make(40, TRAIN_SEED) == make(40, TRAIN_SEED)
    train, held_out = make(300, TRAIN_SEED), make(100, EVAL_SEED)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held_out}
    for example in train:
        items = example["prompt"].split(": ", 1)[1].split()
        expected = sorted(items, key=int) if name == "sort" else items[::-1]
        assert example["completion"] == " ".join(expected) and example["prompt"].endswith("\n")
