"""Serving rate sweep: the embedded SmolLM2-135M-Instruct with 64 LoRA adapters under Zipf
popularity, measured by `tandem bench` (issue 7's reference figure for the README).

Writes 64 random PEFT adapters (ranks 8 to 16, all seven linear targets) into a temporary
adapters directory, starts `tandem serve` on them (its own process, as a user would), runs
`tandem bench` over a sweep of Poisson request rates, and keeps the JSON and PNGs it writes
in bench/results/, with the machine, the commit and the exact commands added.

    .venv/bin/python bench/serving_sweep.py            # the reference sweep (~10 minutes on 2 cores)
    .venv/bin/python bench/serving_sweep.py --quick    # a smoke run
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import RESULTS, machine_info, write_result  # noqa: E402
from tandem.client import TandemClient  # noqa: E402
from tandem.server.adapters.peft_format import peft_config, write_adapter  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 3 KV heads of 64.
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
LAYERS = 30
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapters(root: Path, count: int, seed: int) -> list[str]:
    """`count` adapters named lora-00.. with ranks 8..16; B small, so outputs stay fluent."""
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        r = int(torch.randint(8, 17, (1,), generator=g))
        tensors = {}
        for layer in range(LAYERS):
            for module, (fan_in, fan_out) in SHAPES.items():
                block = "self_attn" if module in ATTENTION else "mlp"
                key = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) / fan_in**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.01
        name = f"lora-{i:02d}"
        write_adapter(root / name, peft_config(r, 2 * r, list(SHAPES), False, 0.0, "SmolLM2-135M-Instruct"), tensors)
        names.append(name)
    return names


def start_server(root: Path, adapters_dir: Path, max_loras: int) -> tuple[subprocess.Popen, list[str], dict]:
    """`tandem serve` on free ports; returns the process, its command and the ports it logged."""
    log = root / "server.log"
    command = [sys.executable, "-m", "tandem.server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
               "--http-port", "off", "--adapters-dir", str(adapters_dir), "--max-lora-rank", "16", "--max-loras", str(max_loras)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "listening":
                ports = json.loads(line)
                with TandemClient(f"127.0.0.1:{ports['port']}", max_retries=0) as client:
                    while client.health("tandem.v1.GenerationService") != "SERVING":
                        if process.poll() is not None:
                            raise RuntimeError(log.read_text()[-2000:])
                        time.sleep(0.5)
                return process, command, ports
        if process.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 10 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two rates, few requests")
    parser.add_argument("--rates", default="0.5,1,2,4,inf", help="Poisson request rates (requests/s)")
    parser.add_argument("--num-requests", type=int, default=40, help="requests per rate")
    parser.add_argument("--output-len", type=int, default=32, help="tokens per request (ignore_eos)")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--zipf-alpha", type=float, default=1.0)
    parser.add_argument("--max-loras", type=int, default=16, help="the server's device adapter slots")
    parser.add_argument("--slo", default="ttft=2,tpot=0.25", help="goodput SLOs (CPU-sized)")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.num_requests, args.output_len = "1,inf", 8, 16
    stem = "serving_sweep_cpu" + ("_quick" if args.quick else "")
    with tempfile.TemporaryDirectory(prefix="tandem-sweep-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        names = write_adapters(root / "adapters", args.adapters, seed=0)
        print(f"wrote {len(names)} adapters in {time.monotonic() - started:.0f} s", flush=True)
        server, serve_command, ports = start_server(root, root / "adapters", args.max_loras)
        try:
            bench_command = [
                sys.executable, "-m", "tandem.server.cli", "bench", "--target", f"127.0.0.1:{ports['port']}",
                "--metrics-url", f"http://127.0.0.1:{ports['metrics_port']}/metrics", "--request-rate", args.rates,
                "--num-requests", str(args.num_requests), "--output-len", str(args.output_len), "--popularity", "zipf",
                "--zipf-alpha", str(args.zipf_alpha), "--adapters", ",".join(names), "--warmup-requests", "4",
                "--slo", args.slo, "--json", str(RESULTS / f"{stem}.json"),
            ]
            subprocess.run(bench_command, cwd=REPO, check=True)
        finally:
            server.terminate()
            server.wait(60)
    result = json.loads((RESULTS / f"{stem}.json").read_text())
    shown = lambda command: shlex.join(["tandem", *command[3:]])  # noqa: E731  (python -m tandem.server.cli -> tandem)
    result["machine"] = machine_info()
    result["commands"] = {"serve": shown(serve_command), "bench": shown(bench_command).replace(",".join(names), "lora-00,...,lora-63")}
    result["adapters"] = {"count": len(names), "ranks": "8..16", "targets": list(SHAPES), "popularity": f"zipf alpha {args.zipf_alpha}"}
    write_result(stem, result)


if __name__ == "__main__":
    main()
