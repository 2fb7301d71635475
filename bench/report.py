"""What every benchmark result records (the machine, the commit, the date) and where it goes."""

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_kind() -> str:
    """The vendor ("intel", "amd", "other"), with "_bf16" where the CPU computes bfloat16
    natively: results whose ratios differ by kind (MKL's float32 GEMMs, which base path and
    dtype the engine takes) are kept one file per kind."""
    from tandem.kernels.packed_linear import cpu_vendor
    from tandem.server.config import cpu_has_bf16

    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(cpu_vendor(), "other")
    return vendor + ("_bf16" if cpu_has_bf16() else "")


def machine_info() -> dict:
    cpu, family = platform.processor(), None
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        cpu = fields.get("model name", cpu)
        # "AMD EPYC" names both Zen 4 (family 25) and Zen 5 (family 26) hosts, whose GEMMs
        # differ ~2x: the family and model say which one a result came from.
        family = f"family {fields.get('cpu family')} model {fields.get('model')}"
    except OSError:
        pass
    try:
        # The repository's commit, wherever the bench was started from.
        repo = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=repo).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=repo).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "uncommitted", True
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_family": family,
        "cpu_kind": cpu_kind(),
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_result(stem: str, result: dict, plot: Callable[[dict, Path], None] | None = None) -> None:
    """bench/results/<stem>.json, and <stem>.png when the benchmark draws one."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None:
        plot(result, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json" + (" and .png" if plot is not None else ""))
