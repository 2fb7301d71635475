"""What adapter algebra costs in task accuracy (issue 12): the three synthetic-task adapters
(bench/task_adapters.py), each scored on its own task; a TIES and a Breadcrumbs merge of the
three (through the registry's merge, as Adapters.MergeAdapters does) scored on every task;
and each adapter ComPEFT-compressed (through the registry's compress, as
Adapters.CompressAdapter does, then read back the way the server reads compressed adapters)
at several densities, scored on its task, with the compression ratios in bytes (the weights
file on disk, and the host-cache bytes against float32 PEFT).

Goal (issue 12): each compressed adapter keeps at least 95% of its uncompressed task accuracy
at the chosen density (the lowest density at which all three do, reported as chosen_density).

    .venv/bin/python bench/algebra_eval.py [--steps 30] [--eval 30] [--densities 0.05 0.1 0.2 0.3 0.5 1] [--adapters-dir DIR] [--quick]
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from bench.synthetic_task import TASKS  # noqa: E402
from bench.task_adapters import (  # noqa: E402
    RANK, accuracy, add_arguments, adapters_dir, apply_quick, held_out, load_model, make_engine, task_adapters,
)
from tandem.server.adapters.compeft_format import WEIGHTS_FILE as COMPRESSED_FILE  # noqa: E402
from tandem.server.adapters.merging import MergeSpec  # noqa: E402
from tandem.server.adapters.peft_format import WEIGHTS_FILE  # noqa: E402

GOALS = {"compressed_vs_uncompressed": 0.95}
MERGES = ("ties", "breadcrumbs")
MERGE_RANK = len(TASKS) * RANK  # the rank of the sum of the deltas: the SVD loses only what the method adds


def compressed_name(task: str, density: float) -> str:
    return f"{task}-compeft-d{density:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0], help="ComPEFT densities")
    args = parser.parse_args()
    apply_quick(args)
    loaded = load_model(args.quick)
    examples = held_out(args.eval)
    result: dict = {"benchmark": "algebra_eval", "machine": machine_info(), "model": loaded.name,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "goals": GOALS}
    with adapters_dir(args.adapters_dir) as directory:
        engine = make_engine(loaded, directory, max_loras=2, max_rank=MERGE_RANK)
        result["task_adapters"] = task_adapters(engine, args.train, args.steps)
        adapters = {task: {"own_task": accuracy(engine, examples[task], task)} for task in TASKS}
        for task in TASKS:
            print(f"{task:12s} on its task {adapters[task]['own_task']:.2f}", flush=True)

        merges = {}
        for method in MERGES:
            _, errors = engine.registry.merge(method, MergeSpec(tuple(TASKS), (), method, rank=MERGE_RANK))
            spec = MergeSpec(tuple(TASKS), (), method)
            merges[method] = {
                "rank": MERGE_RANK, "density": spec.density_or_default,
                **({"gamma": spec.gamma_or_default} if method == "breadcrumbs" else {}),
                "reconstruction_error_mean": statistics.fmean(errors.values()), "reconstruction_error_max": max(errors.values()),
                "accuracy": {task: accuracy(engine, examples[task], method) for task in TASKS},
            }
            merges[method]["vs_matching_adapter"] = {
                t: ratio(merges[method]["accuracy"][t], adapters[t]["own_task"]) for t in TASKS
            }
            print(f"{method:12s} " + "  ".join(f"{t} {a:.2f}" for t, a in merges[method]["accuracy"].items()), flush=True)

        compressed: dict[str, dict[str, dict]] = {task: {} for task in TASKS}
        for task in TASKS:
            peft_bytes = (directory / task / WEIGHTS_FILE).stat().st_size
            for density in args.densities:
                name = compressed_name(task, density)
                info = engine.registry.compress(name, task, density)
                score = accuracy(engine, examples[task], name)
                compressed[task][f"{density:g}"] = {
                    "accuracy": score,
                    "vs_uncompressed": ratio(score, adapters[task]["own_task"]),
                    "file_bytes": (directory / name / COMPRESSED_FILE).stat().st_size,
                    "file_ratio": peft_bytes / (directory / name / COMPRESSED_FILE).stat().st_size,
                    "host_ratio": info.compression_ratio,
                }
                print(f"{name:24s} accuracy {score:.2f}  file x{compressed[task][f'{density:g}']['file_ratio']:.1f}  "
                      f"host x{info.compression_ratio:.1f}", flush=True)
            adapters[task]["peft_file_bytes"] = peft_bytes

    keeps = {f"{d:g}": all((compressed[t][f"{d:g}"]["vs_uncompressed"] or 0) >= GOALS["compressed_vs_uncompressed"] for t in TASKS)
             for d in args.densities}
    chosen = min((d for d in args.densities if keeps[f"{d:g}"]), default=None)
    result.update(
        adapters=adapters, merges=merges, compressed=compressed, densities_meeting_goal=keeps,
        chosen_density=chosen, meets_goals=chosen is not None,
    )
    print_table(result)
    write_result("algebra_eval" + ("_quick" if args.quick else ""), result, plot)


def ratio(score: float, reference: float) -> float | None:
    return score / reference if reference else None


def print_table(result: dict) -> None:
    tasks = list(TASKS)
    print(f"\n{'exact match':28s} " + "  ".join(f"{t:>7s}" for t in tasks))
    print(f"{'adapter on its own task':28s} " + "  ".join(f"{result['adapters'][t]['own_task']:7.2f}" for t in tasks))
    for method, merge in result["merges"].items():
        print(f"{method + ' merge (rank ' + str(merge['rank']) + ')':28s} " + "  ".join(f"{merge['accuracy'][t]:7.2f}" for t in tasks))
    for density in result["compressed"][tasks[0]]:
        row = [result["compressed"][t][density] for t in tasks]
        print(f"{'compressed d=' + density:28s} " + "  ".join(f"{c['accuracy']:7.2f}" for c in row)
              + f"   file x{statistics.fmean(c['file_ratio'] for c in row):.1f}  host x{statistics.fmean(c['host_ratio'] for c in row):.1f}")
    print(f"chosen density (all keep >= {GOALS['compressed_vs_uncompressed']:.0%} of their accuracy): {result['chosen_density']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(TASKS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = {"adapter": [result["adapters"][t]["own_task"] for t in tasks]}
    rows.update({f"{m} merge": [merge["accuracy"][t] for t in tasks] for m, merge in result["merges"].items()})
    width = 0.8 / len(rows)
    for i, (label, values) in enumerate(rows.items()):
        left.bar([c + i * width for c in range(len(tasks))], values, width, label=label)
    left.set_xticks([c + 0.4 - width / 2 for c in range(len(tasks))], tasks)
    left.set_ylim(0, 1.05)
    left.set_ylabel("exact match")
    left.set_title("task adapters and merges of all three", fontsize=9)
    left.legend(fontsize=8)
    for t in tasks:
        densities = [float(d) for d in result["compressed"][t]]
        right.plot(densities, [c["accuracy"] for c in result["compressed"][t].values()], marker="o", label=t)
        right.axhline(result["adapters"][t]["own_task"], linestyle=":", color=right.lines[-1].get_color())
    right.set_xlabel("ComPEFT density (dotted: uncompressed)")
    right.set_ylim(0, 1.05)
    right.set_title("compressed adapters on their task", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: adapter algebra, {result['args']['eval']} held-out examples per task", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
