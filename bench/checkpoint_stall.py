"""How long a fine-tuning checkpoint holds the engine thread, which serves every running
request between micro-batches: before 2026-12-07 it wrote the checkpoint itself (copy,
serialize, write, fsync, rename); now it copies the adapter's weights and the optimizer's
state and a thread of its own serializes and writes them (server/finetune/checkpoints.Writer).
Both are timed here with the functions jobs.py calls, on SmolLM2's default LoRA job (rank 16, every linear) with its AdamW state, into
a data directory on this machine's disk (a network volume's fsyncs are slower still).

    .venv/bin/python bench/checkpoint_stall.py [--data-dir DIR]    # ~30 s on 2 cores
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.adapters.peft_format import adapter_files, peft_config  # noqa: E402
from tandem.server.engine.host_allocator import keep_freed_memory  # noqa: E402
from tandem.server.finetune import checkpoints  # noqa: E402
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter  # noqa: E402
from tandem.server.model.loader import load_model  # noqa: E402

ROUNDS = 7


def trained_state(adapter: TrainableAdapter) -> dict:
    """A trainer's state after one step: AdamW's two moments per master, as Trainer.state_dict."""
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, fused=True)
    for p in adapter.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return {"step": 1, "tokens": 0, "optimizer": optimizer.state_dict(), "scheduler": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="where the checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as the CPU engine: the copies reuse what the last ones freed
    loaded = load_model(None, torch.float32, torch.device("cpu"))
    spec = LoRASpec()
    adapter = TrainableAdapter(loaded.model, spec, seed=0)
    config = peft_config(spec.r, spec.lora_alpha, list(spec.target_modules), spec.use_rslora, spec.lora_dropout, loaded.name)
    state = trained_state(adapter)
    root = Path(tempfile.mkdtemp(prefix="checkpoint-stall-", dir=args.data_dir))
    held_before, held_now, written = [], [], []
    for step in range(1, ROUNDS + 1):
        began = time.perf_counter()
        checkpoints.save(root / "before", step, adapter_files(config, adapter.peft_tensors(), adapter.a_init_seed), state)
        held_before.append(time.perf_counter() - began)

        began = time.perf_counter()
        tensors, copied = {k: v.clone() for k, v in adapter.peft_tensors().items()}, copy.deepcopy(state)
        held_now.append(time.perf_counter() - began)
        began = time.perf_counter()
        checkpoints.save(root / "now", step, adapter_files(config, tensors, adapter.a_init_seed), copied)
        written.append(time.perf_counter() - began)
    size = sum(f.stat().st_size for f in checkpoints.latest(root / "now").iterdir())
    result = {
        "benchmark": "checkpoint_stall",
        "machine": machine_info(),
        "data_dir": str(root),
        "adapter": {"r": spec.r, "target_modules": list(spec.target_modules), "parameters": sum(p.numel() for p in adapter.parameters())},
        "checkpoint_bytes": size,
        "rounds": ROUNDS,
        "engine_thread_seconds_before": held_before,
        "engine_thread_seconds_now": held_now,
        "background_write_seconds_now": written,
        "median_ratio_before_over_now": statistics.median(held_before) / statistics.median(held_now),
    }
    ms = lambda xs: f"{1e3 * statistics.median(xs):.0f} ms (max {1e3 * max(xs):.0f})"  # noqa: E731
    print(f"checkpoint: {size / 1e6:.1f} MB, {ROUNDS} rounds, data dir {root}")
    print("| engine thread held, before | engine thread held, now | written in the background, now | before / now |")
    print("| --- | --- | --- | --- |")
    print(f"| {ms(held_before)} | {ms(held_now)} | {ms(written)} | {result['median_ratio_before_over_now']:.1f}x |")
    write_result("checkpoint_stall", result)


if __name__ == "__main__":
    main()
