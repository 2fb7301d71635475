"""Incremental detokenization and stop-string handling for one sequence.

Decoding a token alone loses context (a leading space, half of a multi-byte character), so
each step decodes a short window of tokens before and after the new ones and emits only the
text that is complete. Text that could still become a stop string is held back until it
cannot. Stop strings are looked for only where one could end in the new text (the new text
and the longest stop string's length before it), so a step costs the same however long the
text grows; SamplingParams bounds how many stop strings there are and how long.
"""

from typing import Any

# Tokens of context before the unread ones; enough for byte-level and SentencePiece merges.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> bool:
        """Append one generated token; True when a stop string appeared (text is cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        if not full.startswith(prefix):
            # Prompt ids that end inside a character decode to U+FFFD there: the generated
            # tokens complete it, and the character is theirs to emit (it was dropped).
            prefix = prefix.rstrip("\ufffd")
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        start = max(len(self.text) - self.hold_back, 0)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        found = [at for s in self.stop if (at := self.text.find(s, start)) != -1]
        if found:
            # The earliest stop string wins, whatever its place in the list.
            self.text = self.text[: min(found)]
            return True
        return False

    def take(self, finished: bool) -> str:
        """The text not yet handed out; while running, keep back what may start a stop string."""
        end = len(self.text) if finished else max(len(self.text) - self.hold_back, self.emitted)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def _decode(self, start: int, end: int) -> str:
        return decode_text(self.tokenizer, self.ids[start:end])


def decode_text(tokenizer, token_ids: list[int]) -> str:
    """Token ids' text as served: no special tokens, and no clean-up of spaces before
    punctuation, which Llama 3's tokenizers turn on: " x != y" came back " x!= y", a stop
    string " !=" could never match, and the windowed decode, whose earlier window's text must
    be a prefix of the next one's, lost whole characters where the clean-up broke that."""
    return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
