"""What a GGUF file says that transformers' GGUF reader drops, read with llama.cpp's meaning.

transformers builds a Llama config and tokenizer from a GGUF's keys, but maps no RoPE
scaling key and skips the `rope_freqs` tensor, in which llama.cpp stores Llama 3.1's llama3
scaling (one factor per frequency): a Llama 3.x GGUF was served with unscaled frequencies,
wrong past its original context and off at every position. Nor does it read the
end-of-turn and end-of-message ids llama.cpp stops on (a Llama 3.1 GGUF stopped on
<|eot_id|> only, never on <|eom_id|> or <|end_of_text|>).
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from tandem.server.errors import ModelLoadError

ROPE_FACTORS_TENSOR = "rope_freqs.weight"
# Besides tokenizer.ggml.eos_token_id, which transformers reads.
END_TOKEN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


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

    def rope_factors(self) -> torch.Tensor | None:
        """The factors llama.cpp divides each RoPE frequency by (None: none); a scaling type
        named in the keys (linear, yarn) is refused, not served unscaled."""
        for key in self._reader.fields:
            if key.endswith(".rope.scaling.type") and self._value(key) not in (None, "", "none"):
                raise ModelLoadError(
                    f"{self.path.name} asks for RoPE scaling {self._value(key)!r}, which Tandem does not read from a GGUF "
                    "file: serve the model's Hugging Face checkpoint directory instead"
                )
        tensor = next((t for t in self._reader.tensors if t.name == ROPE_FACTORS_TENSOR), None)
        if tensor is None:
            return None
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))

    def end_token_ids(self) -> list[int]:
        return [int(v) for v in map(self._value, END_TOKEN_KEYS) if v is not None]


def scale_rope(inv_freq: torch.Tensor, factors: torch.Tensor, path: Path) -> torch.Tensor:
    """inv_freq with llama.cpp's rope_freqs applied (theta_i = pos * inv_freq_i / factor_i)."""
    if factors.shape != inv_freq.shape:
        raise ModelLoadError(
            f"{path.name} has {factors.numel()} RoPE frequency factors ({ROPE_FACTORS_TENSOR}) for {inv_freq.numel()} "
            "frequencies: the file is not a model Tandem can serve"
        )
    return inv_freq / factors.to(inv_freq.dtype)
