"""bench/task_adapters.py trains the synthetic-task adapters once per adapters directory, and
the evaluations (routing_eval, algebra_eval) reuse them only when they were trained on the same
model with the same settings: reusing others would report another adapter's accuracy."""

import json

from bench.synthetic_task import TASKS
from bench.task_adapters import RECORD, load_model, make_engine, task_adapters


def test_trained_once_reused_alike_and_trained_again_when_the_settings_change(tmp_path):
    loaded = load_model(quick=True)

    def run(steps: int) -> tuple[dict, dict[str, str]]:
        engine = make_engine(loaded, tmp_path, max_loras=2)
        record = task_adapters(engine, train=4, steps=steps)
        return record, {task: engine.registry.get(task).content_hash for task in TASKS}

    first, trained = run(steps=1)
    again, reused = run(steps=1)
    assert not first["reused"] and again["reused"]
    assert reused == trained
    changed, retrained = run(steps=2)
    assert not changed["reused"]
    assert all(retrained[task] != trained[task] for task in TASKS)
    assert json.loads((tmp_path / RECORD).read_text())["steps"] == 2
