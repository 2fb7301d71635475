"""Real PEFT LoRA adapters for tests: made with `peft` on a base model, B random and non-zero.

PEFT initialises lora_B to zero (an adapter that changes nothing), so every lora_A and
lora_B weight is refilled from a seeded generator: A ~ N(0, 1/in), B ~ N(0, b_std^2).
The base model is deep-copied first, so a session-wide fixture is never modified.
"""

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")


def make_adapter(
    base_hf_model,
    out_dir: str | Path,
    r: int = 8,
    target_modules=ATTENTION,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    lora_alpha: int = 16,
    seed: int = 0,
    b_std: float = 0.05,
    **lora_config,
) -> Path:
    """Save a PEFT LoRA adapter for base_hf_model into out_dir and return out_dir.

    target_modules: a list of module names or a regex string (PEFT's two forms).
    lora_config: further LoraConfig fields (use_dora, modules_to_save, bias, ...).
    """
    out_dir = Path(out_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
        **lora_config,
    )
    peft_model = get_peft_model(copy.deepcopy(base_hf_model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def edit_config(adapter_dir: Path, **fields) -> None:
    """Change fields of a saved adapter's adapter_config.json (for configs peft cannot make)."""
    path = Path(adapter_dir) / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def weights_file(adapter_dir: Path) -> Path:
    return Path(adapter_dir) / WEIGHTS_FILE
