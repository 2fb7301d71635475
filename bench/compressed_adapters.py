"""Compressed (ComPEFT) vs PEFT adapters: read time (disk -> host cache object: read, hash,
parse, validate), slot load time (host -> device slot, a compressed one unpacked there) and
host-cache capacity, on SmolLM2 shapes with rank-16 adapters on all seven projections.

D distinct random adapters (PEFT float32 as peft writes them, and each one's compressed
copy at --density) are read the way the registry reads them (PEFT files into its host slab)
and loaded alternately, format by format, --reads times each,
so a drift of the shared machine hits both formats alike; the file pages are in the page
cache for both. Host-cache capacity is the server's default budget (--adapter-cache-bytes,
2 GiB) over each format's host bytes, beside the 2048 adapters of issue 2's serving workload
(64 slots). Goals (issue 12): >= 8x more adapters in the same cache, >= 3x faster reads.

    .venv/bin/python bench/compressed_adapters.py [--quick] [--density 0.5]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lora_serving import load  # noqa: E402
from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.adapters.compeft_format import WEIGHTS_FILE as COMPRESSED_FILE  # noqa: E402
from tandem.server.adapters.compeft_format import compressed_files, read_compressed  # noqa: E402
from tandem.server.adapters.host_slab import HostSlab  # noqa: E402
from tandem.server.adapters.lora_init import draw_order, initial_a  # noqa: E402
from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter  # noqa: E402
from tandem.server.adapters.slot_pool import SlotPool  # noqa: E402
from tandem.server.config import EngineConfig  # noqa: E402
from tandem.server.model.lora_targets import module_path  # noqa: E402
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter  # noqa: E402

RANK, SLOTS, WORKLOAD_ADAPTERS = 16, 64, 2048
GOALS = {"capacity_ratio": 8.0, "read_speedup": 3.0}
FORMATS = ("peft", "compeft")


def make_files(hf, root: Path, count: int, density: float) -> None:
    """count adapters as the trainer leaves them (A = its seeded draw plus a move, B the
    move), each as PEFT writes it and compressed as `tandem adapters compress` would: A as
    its move from the redrawn start, so every compressed read redraws it."""
    from safetensors.torch import load_file

    layers = hf.config.num_hidden_layers
    for i in range(count):
        peft_dir = make_adapter(hf, root / "peft" / f"a{i}", r=RANK, target_modules=ALL_LINEAR, seed=i)
        config = json.loads((peft_dir / CONFIG_FILE).read_text())
        moves = load_file(str(peft_dir / WEIGHTS_FILE))
        modules = draw_order((layer, target) for layer in range(layers) for target in ALL_LINEAR)
        keys = [f"base_model.model.{module_path(layer, target)}.lora_{ab}.weight" for layer, target in modules for ab in "AB"]
        starts = iter(initial_a([tuple(moves[k].shape) for k in keys[::2]], seed=i))
        tensors = {k: next(starts) + 0.1 * moves[k] if ".lora_A." in k else moves[k] for k in keys}
        write_adapter(peft_dir, config, tensors, a_init_seed=i)
        files = compressed_files(config, tensors, density, a_init_seed=i)
        (root / "compeft" / f"a{i}").mkdir(parents=True)
        for name, data in files.items():
            (root / "compeft" / f"a{i}" / name).write_bytes(data)


def measure(model, root: Path, count: int, reads: int) -> dict:
    """Each format read as the registry reads it: PEFT files into a host slab filled once
    (memory touched before, as in a serving process), compressed ones into a small copy."""
    pool = SlotPool(model, 1, RANK, torch.float32, torch.device("cpu"))
    slab = HostSlab(count * ((root / "peft" / "a0" / WEIGHTS_FILE).stat().st_size + (1 << 16)))
    held = [read_adapter(f"a{i}", root / "peft" / f"a{i}", model, RANK, buffer=slab.block) for i in range(count)]
    del held
    readers = {
        "peft": lambda name, path, model, rank: read_adapter(name, path, model, rank, buffer=slab.block),
        "compeft": read_compressed,
    }
    times = {f: {"read": [], "load": []} for f in FORMATS}
    sizes = {}
    for r in range(reads):
        for fmt in FORMATS if r % 2 == 0 else reversed(FORMATS):
            i = r % count
            start = time.perf_counter()
            adapter = readers[fmt](f"a{i}", root / fmt / f"a{i}", model, RANK)
            times[fmt]["read"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pool._load(0, adapter)
            times[fmt]["load"].append(time.perf_counter() - start)
            sizes[fmt] = {"host_bytes": adapter.nbytes, "float32_bytes": adapter.float32_bytes}
    weights = {"peft": WEIGHTS_FILE, "compeft": COMPRESSED_FILE}
    out = {}
    for fmt in FORMATS:
        out[fmt] = {
            "read_ms_median": 1e3 * statistics.median(times[fmt]["read"]),
            "load_ms_median": 1e3 * statistics.median(times[fmt]["load"]),
            "file_bytes": (root / fmt / "a0" / weights[fmt]).stat().st_size,
            **sizes[fmt],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny random model, few reads (a smoke run)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--distinct", type=int, default=4)
    ap.add_argument("--reads", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded, hf, _ = load("tiny" if args.quick else "smollm2", torch.float32, torch.device("cpu"))
    reads = 4 if args.quick else args.reads
    budget = EngineConfig.adapter_cache_bytes
    root = Path(tempfile.mkdtemp(prefix="tandem-compeft-bench-"))
    try:
        make_files(hf, root, args.distinct, args.density)
        formats = measure(loaded.model, root, args.distinct, reads)
    finally:
        shutil.rmtree(root)
    for fmt in formats.values():
        fmt["host_cache_capacity"] = budget // fmt["host_bytes"]
        fmt["read_plus_load_ms"] = fmt["read_ms_median"] + fmt["load_ms_median"]
    peft, comp = formats["peft"], formats["compeft"]
    summary = {
        "capacity_ratio": comp["host_cache_capacity"] / peft["host_cache_capacity"],
        "read_speedup": peft["read_ms_median"] / comp["read_ms_median"],
        "load_slowdown": comp["load_ms_median"] / peft["load_ms_median"],
        "read_plus_load_speedup": peft["read_plus_load_ms"] / comp["read_plus_load_ms"],
        "file_ratio": peft["file_bytes"] / comp["file_bytes"],
        "workload_adapters_fit": {f: min(WORKLOAD_ADAPTERS, formats[f]["host_cache_capacity"]) for f in FORMATS},
    }
    result = {
        "machine": machine_info(),
        "model": "tiny" if args.quick else "smollm2",
        "workload": {"rank": RANK, "targets": list(ALL_LINEAR), "density": args.density, "distinct_adapters": args.distinct,
                     "reads_per_format": reads, "host_cache_budget_bytes": budget, "workload_adapters": WORKLOAD_ADAPTERS, "slots": SLOTS},
        "formats": formats,
        "summary": summary,
        "goals": GOALS,
    }
    print(f"{'format':8} {'file MB':>8} {'host MB':>8} {'read ms':>8} {'load ms':>8} {'fit in cache':>12}")
    for name, f in formats.items():
        print(f"{name:8} {f['file_bytes'] / 1e6:8.2f} {f['host_bytes'] / 1e6:8.2f} {f['read_ms_median']:8.2f} "
              f"{f['load_ms_median']:8.2f} {f['host_cache_capacity']:12d}")
    print(f"capacity x{summary['capacity_ratio']:.1f} (goal {GOALS['capacity_ratio']}), read x{summary['read_speedup']:.1f} "
          f"(goal {GOALS['read_speedup']}), slot load x{summary['load_slowdown']:.2f} slower, read+load x{summary['read_plus_load_speedup']:.1f}")
    write_result(f"compressed_adapters_cpu_d{args.density:g}" + ("_quick" if args.quick else ""), result, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = result["formats"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
    panels = [("read_ms_median", "read ms (median)"), ("load_ms_median", "slot load ms (median)"), ("host_cache_capacity", "adapters in a 2 GiB host cache")]
    for ax, (key, label) in zip(axes, panels):
        values = [formats[f][key] for f in FORMATS]
        bars = ax.bar(FORMATS, values, color=["tab:blue", "tab:orange"])
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{result['model']}, rank {result['workload']['rank']} all-linear, density {result['workload']['density']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
