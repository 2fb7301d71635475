"""What each request asks: the synthetic chat prompts shipped beside this file, the first
human turn of each ShareGPT conversation, or random token ids of given lengths.

Datasets carry a reference output length (the synthetic set's `output_len`, a ShareGPT
reply's token count), each request's max_new_tokens unless --output-len sets one for all.
"""

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTHETIC_PROMPTS = Path(__file__).with_name("synthetic_prompts.jsonl")
# Random prompts avoid the lowest ids, where tokenizers keep their special tokens.
RANDOM_TOKEN_FLOOR = 100

# The client's tokenize: a text positionally, or chat messages (rendered with the model's chat
# template, as a request's messages are) by keyword.
Tokenize = Callable[..., Awaitable[list[int]]]


@dataclass(frozen=True)
class Prompt:
    """One request's input: chat messages or token ids; output_len is the dataset's reference
    length (None when it has none)."""

    messages: tuple[dict, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    output_len: int | None = None

    def request_fields(self) -> dict:
        if self.prompt_token_ids:
            return {"prompt_token_ids": list(self.prompt_token_ids)}
        return {"messages": [dict(m) for m in self.messages]}


def _user(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)


def synthetic_prompts(path: Path = SYNTHETIC_PROMPTS) -> list[Prompt]:
    """The shipped set: one {"prompt", "output_len"} object per line."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            prompts.append(Prompt(messages=_user(item["prompt"]), output_len=int(item["output_len"])))
    return prompts


def _first_exchange(conversation: object) -> tuple[str, str] | None:
    """The first human turn and the reply to it, or None when the entry has neither."""
    turns = conversation.get("conversations") if isinstance(conversation, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, reply = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(reply, dict)) or first.get("from") not in ("human", "user"):
        return None
    prompt, answer = first.get("value"), reply.get("value")
    return (prompt, answer) if isinstance(prompt, str) and isinstance(answer, str) and prompt and answer else None


async def sharegpt_prompts(path: str | Path, count: int, rng: np.random.Generator, tokenize: Tokenize,
                           max_total_len: int, fixed_output_len: int | None = None) -> list[Prompt]:
    """Up to `count` conversations in a random order whose request fits max_total_len tokens:
    the prompt as sent (a chat message, in the model's template) plus the max_new_tokens it
    will ask (fixed_output_len, else the reply's length), which is what the server checks;
    the raw text's tokens undercount it, and a prompt let through was then refused. Replies
    of fewer than 4 tokens are skipped (as vLLM's benchmark does)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}} objects")
    exchanges = [e for e in map(_first_exchange, data) if e is not None]
    prompts: list[Prompt] = []
    for index in rng.permutation(len(exchanges)):
        if len(prompts) == count:
            break
        prompt, answer = exchanges[index]
        output_len = len(await tokenize(answer))
        if output_len < 4:
            continue
        candidate = Prompt(messages=_user(prompt), output_len=output_len)
        asked = fixed_output_len if fixed_output_len is not None else output_len
        if len(await tokenize(**candidate.request_fields())) + asked <= max_total_len:
            prompts.append(candidate)
    if not prompts:
        raise ValueError(f"{path}: no conversation has a human turn and a reply that fit {max_total_len} tokens")
    return prompts


def random_prompts(count: int, input_len: int, output_len: int, vocab_size: int, rng: np.random.Generator,
                   range_ratio: float = 0.0) -> list[Prompt]:
    """Token-id prompts; lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("random prompts need --random-input-len and --random-output-len >= 1")

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=count)

    floor = min(RANDOM_TOKEN_FLOOR, vocab_size - 1)
    return [
        Prompt(prompt_token_ids=tuple(int(t) for t in rng.integers(floor, vocab_size, size=int(n_in))), output_len=int(n_out))
        for n_in, n_out in zip(lengths(input_len), lengths(output_len))
    ]
