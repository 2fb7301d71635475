"""What a GGUF file says that transformers' GGUF reader drops, read with llama.cpp's meaning.

transformers builds a Llama config and tokenizer from a GGUF's keys, but maps no RoPE
scaling key and skips the `rope_freqs` tensor, in which llama.cpp stores Llama 3.1's llama3
scaling (one factor per frequency): a Llama 3.x GGUF was served with unscaled frequencies,
wrong past its original context and off at every position. Nor does it read the
end-of-turn and end-of-message ids llama.cpp stops on (a Llama 3.1 GGUF stopped on
<|eot_id|> only, never on <|eom_id|> or <|end_of_text|>). Nor does it read a linear RoPE
factor, which llama.cpp applies where the file names no scaling type or names linear: such a
file was served unscaled, wrong from the second position.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from tandem.server.errors import ModelLoadError

ROPE_FACTORS_TENSOR = "rope_freqs.weight"
# Besides tokenizer.ggml.eos_token_id, which transformers reads.
END_TOKEN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# llama.cpp's key for the linear RoPE factor, then the older name it falls back to.
LINEAR_FACTOR_KEYS = ("rope.scaling.factor", "rope.scale_linear")


class GGUFExtras:
    def __init__(self, path: Path):
        self.path = path
        self._reader = GGUFReader(path)

    def _value(self, key: str) -> object:
        field = self._reader.fields.get(key)
        if field is None or not field.data:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value.tolist()[0]

    def _arch_value(self, suffix: str) -> object:
        return self._value(f"{self._value('general.architecture')}.{suffix}")

    def rope_factors(self) -> torch.Tensor | None:
        """The factors llama.cpp divides each RoPE frequency by (None: none): the rope_freqs
        tensor's (one per frequency, Llama 3.x) times the linear factor, a single factor for
        every frequency where there is no such tensor."""
        linear = self.linear_rope_factor()
        tensor = next((t for t in self._reader.tensors if t.name == ROPE_FACTORS_TENSOR), None)
        if tensor is None:
            return None if linear == 1.0 else torch.tensor([linear])
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1)) * linear

    def linear_rope_factor(self) -> float:
        """The linear factor llama.cpp divides every RoPE frequency by (1.0: none): a file that
        names no scaling type is linear to it, as one naming linear; "none" never scales; any
        other type (yarn) is refused, not served unscaled."""
        kind = self._arch_value("rope.scaling.type")
        if kind in ("", "none"):
            return 1.0
        if kind not in (None, "linear"):
            raise ModelLoadError(
                f"{self.path.name} asks for RoPE scaling {kind!r}, which Tandem does not read from a GGUF "
                "file: serve the model's Hugging Face checkpoint directory instead"
            )
        factor = next((v for v in map(self._arch_value, LINEAR_FACTOR_KEYS) if v is not None), 0.0)
        return float(factor) or 1.0  # llama.cpp reads a factor of 0 as none

    def end_token_ids(self) -> list[int]:
        return [int(v) for v in map(self._value, END_TOKEN_KEYS) if v is not None]


def scale_rope(inv_freq: torch.Tensor, factors: torch.Tensor, path: Path) -> torch.Tensor:
    """inv_freq with llama.cpp's factors applied (theta_i = pos * inv_freq_i / factor_i; a single
    factor divides every frequency, as transformers' linear RoPE does)."""
    if factors.shape not in (inv_freq.shape, (1,)):
        raise ModelLoadError(
            f"{path.name} has {factors.numel()} RoPE frequency factors ({ROPE_FACTORS_TENSOR}) for {inv_freq.numel()} "
            "frequencies: the file is not a model Tandem can serve"
        )
    return inv_freq / factors.to(inv_freq.dtype)
