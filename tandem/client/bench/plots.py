"""PNG plots next to the JSON: latency and throughput against the offered load, and the
latency CDFs of every load point. Needs matplotlib (the `bench` extra)."""

from pathlib import Path

import matplotlib
import numpy as np

from tandem.client.bench.runner import PointResult

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency"))


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

def _load_axis(result: dict) -> tuple[list[str], str]:
    loads = [p["load"] for p in result["points"]]
    if all(load["concurrency"] is not None for load in loads):
        return [str(load["concurrency"]) for load in loads], "concurrency (requests in flight)"
    return [str(load["rate"]) for load in loads], "offered request rate (requests/s)"


def plot_sweep(result: dict, path: Path) -> None:
    """Left: TTFT, TPOT and E2E (median and p99) per load point; right: throughput and goodput."""
    ticks, xlabel = _load_axis(result)
    x = np.arange(len(ticks))
    fig, (lat_ax, tput_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E")):
        for stat, style in (("median", "-o"), ("p99", "--x")):
            values = [p["latency"][key][stat] for p in result["points"]]
            lat_ax.plot(x, [np.nan if v is None else v * 1000 for v in values], style, label=f"{name} {stat}")
    lat_ax.set(yscale="log", ylabel="ms", xlabel=xlabel, title="latency")
    tput_ax.plot(x, [p["output_throughput"] for p in result["points"]], "-o", label="output tokens/s")
    req_ax = tput_ax.twinx()
    req_ax.plot(x, [p["request_throughput"] for p in result["points"]], "-s", color="tab:green", label="requests/s")
    if all("goodput" in p for p in result["points"]):
        req_ax.plot(x, [p["goodput"]["requests_per_second"] for p in result["points"]], "--^", color="tab:red",
                    label="goodput (requests/s within SLO)")
    tput_ax.set(ylabel="output tokens/s", xlabel=xlabel, title="throughput")
    req_ax.set_ylabel("requests/s")
    for ax in (lat_ax, tput_ax):
        ax.set_xticks(x, ticks)
        ax.grid(alpha=0.3)
    lat_ax.legend(fontsize=8)
    handles = tput_ax.get_legend_handles_labels()[0] + req_ax.get_legend_handles_labels()[0]
    tput_ax.legend(handles=handles, fontsize=8, loc="upper left")
    model = result.get("model", {}).get("model", "")
    fig.suptitle(f"tandem bench: {model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _samples(point: PointResult, key: str) -> np.ndarray:
    ok = [r for r in point.records if r.ok]
    if key == "itl":
        return np.sort([gap for r in ok for gap in r.itls])
    return np.sort([v for v in (getattr(r, key) for r in ok) if v is not None])


def plot_cdfs(results: list[PointResult], path: Path) -> None:
    """One panel per latency, one curve per load point."""
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(16, 4))
    for ax, (key, name) in zip(axes, LATENCIES):
        for point in results:
            values = _samples(point, key)
            if values.size:
                ax.step(values * 1000, np.arange(1, values.size + 1) / values.size, where="post", label=point.point.label)
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of samples", title=f"{name} CDF", xscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paths(json_path: Path) -> tuple[Path, Path]:
    """<stem>_sweep.png and <stem>_cdf.png beside <stem>.json."""
    return json_path.with_name(f"{json_path.stem}_sweep.png"), json_path.with_name(f"{json_path.stem}_cdf.png")


def write_plots(result: dict, results: list[PointResult], json_path: Path) -> tuple[Path, Path]:
    sweep_path, cdf_path = plot_paths(json_path)
    plot_sweep(result, sweep_path)
    plot_cdfs(results, cdf_path)
    return sweep_path, cdf_path
