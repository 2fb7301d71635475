"""Each token's own bytes, as OpenAI's log-probabilities carry them.

A token decoded alone loses what only its neighbours complete: half of a multi-byte
character comes back as U+FFFD, and a SentencePiece token's leading space is stripped. The
bytes come from the vocabulary instead: a byte-level BPE (GPT-2's scheme: SmolLM2, Llama 3,
Qwen) spells every byte as one printable character; SentencePiece marks a space as U+2581
and spells a byte it has no piece for as `<0xNN>`. Special tokens have none (their text is
skipped, as the detokenizer skips it). The pieces of a completion's tokens, joined, are the
UTF-8 bytes of its text.
"""

import re
from collections.abc import Sequence
from typing import Any

SENTENCEPIECE_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """The character GPT-2's byte-level BPE writes for each byte: printable Latin-1 bytes as
    themselves, every other byte as the next code point from 256 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, shifted = {}, 256
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


class TokenBytes:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        # Added tokens marked special are skipped by the detokenizer too, listed among the
        # special tokens or not (Llama 3's <|python_tag|> is not).
        added = tokenizer.added_tokens_decoder
        self._special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = "ByteLevel" in type(decoder).__name__

    def __call__(self, token_ids: Sequence[int]) -> list[bytes]:
        """The bytes of each token (b"" for a special one)."""
        pieces = []
        for token_id, token in zip(token_ids, self._tokenizer.convert_ids_to_tokens(list(token_ids))):
            if token_id in self._special or token is None:
                pieces.append(b"")
            elif self._byte_level and all(c in _BYTE_LEVEL for c in token):
                pieces.append(bytes(_BYTE_LEVEL[c] for c in token))
            elif match := _BYTE_PIECE.fullmatch(token):
                pieces.append(bytes([int(match[1], 16)]))
            else:
                pieces.append(token.replace(SENTENCEPIECE_SPACE, " ").encode())
        return pieces


def piece_text(piece: bytes) -> str:
    """A token's text: its bytes as UTF-8, U+FFFD for part of a character."""
    return piece.decode("utf-8", errors="replace")
