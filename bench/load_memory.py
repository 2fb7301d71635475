"""Peak memory of loading a model, as a multiple of the built model's bytes, beside what
transformers' own from_pretrained of the same files takes in the same run.

Each load runs in a fresh process, after a warm-up load of a tiny model there (imports, the
tokenizer: not what is measured); a thread samples the process's anonymous resident memory
(RssAnon: a mapping of the checkpoint file is the page cache's, not the process's) every
millisecond. Sources: the embedded SmolLM2 GGUF file, and the same weights saved as a
safetensors directory in bfloat16 and in float32; each loaded into bfloat16 and float32.

    .venv/bin/python bench/load_memory.py        # ~2 minutes on 2 cores
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402

MEASURE = """
import json, sys, threading, time
import torch
from tandem.server.model.loader import load_model

def anon_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))

source, dtype, warm, loader = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3], sys.argv[4]

def load(path):
    if loader == "tandem":
        return load_model(path, dtype, torch.device("cpu")).model
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    p = Path(path)
    kwargs = {"gguf_file": p.name} if p.is_file() else {}
    return AutoModelForCausalLM.from_pretrained(str(p.parent if p.is_file() else p), dtype=dtype, local_files_only=True, **kwargs)

load(warm)
base, peak, done = anon_mb(), [0.0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
model = load(source)
done.set()
sampler.join()
unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
print(json.dumps({"peak_mb": peak[0] - base, "model_mb": sum(unique.values()) / 2**20}))
"""


def measure(source: Path, dtype: str, warm: Path, loader: str) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, str(source), dtype, str(warm), loader], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tandem.server.model.loader import default_model_path

    gguf = default_model_path()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        for name, dtype in (("dir_bfloat16", torch.bfloat16), ("dir_float32", torch.float32)):
            copy = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
            copy.load_state_dict(hf.state_dict())
            copy.save_pretrained(root / name)
            tokenizer.save_pretrained(root / name)
        warm = root / "warm"
        LlamaForCausalLM(LlamaConfig(**{**config, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                        "num_attention_heads": 4, "num_key_value_heads": 2})).save_pretrained(warm)
        tokenizer.save_pretrained(warm)
        del hf
        rows = []
        for source, path in (("gguf", gguf), ("dir_bfloat16", root / "dir_bfloat16"), ("dir_float32", root / "dir_float32")):
            for dtype in ("bfloat16", "float32"):
                ours, theirs = measure(path, dtype, warm, "tandem"), measure(path, dtype, warm, "transformers")
                rows.append({
                    "source": source, "dtype": dtype, "model_mb": ours["model_mb"],
                    "tandem_peak_mb": ours["peak_mb"], "tandem_peak_x": ours["peak_mb"] / ours["model_mb"],
                    "transformers_peak_mb": theirs["peak_mb"], "transformers_peak_x": theirs["peak_mb"] / theirs["model_mb"],
                })
    print(f"{'source':<14}{'dtype':<10}{'model MB':>10}{'Tandem peak':>14}{'transformers':>14}")
    for r in rows:
        print(f"{r['source']:<14}{r['dtype']:<10}{r['model_mb']:>10.0f}{r['tandem_peak_x']:>13.2f}x{r['transformers_peak_x']:>13.2f}x")
    write_result("load_memory_cpu", {"benchmark": "load_memory", "machine": machine_info(), "model": gguf.name, "rows": rows})


if __name__ == "__main__":
    main()
