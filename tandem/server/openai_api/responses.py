"""Engine outputs -> OpenAI response bodies (plain dicts, serialised once by the app).

Log-probabilities name tokens by their text and bytes: the caller looks up the bytes of every
token id the outputs mention (`token_ids_in`, AsyncEngine.token_bytes) and passes them as
`pieces`. A token's text is its bytes as UTF-8 (U+FFFD for part of a character); its bytes,
joined with the other tokens', make the completion's text.
"""

import codecs
import time
from collections.abc import Iterable

from tandem.server.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from tandem.server.engine.token_bytes import piece_text

# OpenAI has one "stop" for both, and none for an abort: a completion the server ended is not
# whole, and the app answers it with an error instead.
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}

TokenPieces = dict[int, bytes]


def token_ids_in(outputs: Iterable[RequestOutput]) -> list[int]:
    """Every token id whose text a response shows (sampled, top and prompt alternatives)."""
    ids: set[int] = set()
    for out in outputs:
        for lp in (out.logprobs or []) + (out.prompt_logprobs or []):
            ids.add(lp.token_id)
            ids.update(t for t, _ in lp.top)
    return sorted(ids)


def finish_reason(out: RequestOutput) -> str | None:
    return FINISH_REASONS.get(out.finish_reason) if out.finished and out.finish_reason else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class TextOffsets:
    """Where each of a choice's tokens starts in the text they make, in characters: a token
    that ends inside a character adds none until the one that completes it."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def add(self, piece: bytes) -> int:
        """The offset of the token with these bytes, the tokens before it added."""
        start = self._chars
        self._chars += len(self._decoder.decode(piece))
        return start


def _top_texts(lp: TokenLogprob, pieces: TokenPieces) -> dict[str, float]:
    """The legacy format's alternatives, keyed by text: the top N and the sampled token, as
    OpenAI and vLLM always add it (up to logprobs + 1 of them; logprobs 0: the sampled token
    alone). Where two decode alike (two halves of characters, special tokens) the likelier
    one stays (top comes likeliest first)."""
    texts: dict[str, float] = {}
    for token_id, logprob in [*lp.top, (lp.token_id, lp.logprob)]:
        texts.setdefault(piece_text(pieces[token_id]), logprob)
    return texts


def completion_logprobs(logprobs: list[TokenLogprob] | None, pieces: TokenPieces, offsets: TextOffsets) -> dict | None:
    """The legacy Completions format; offsets: the choice's, past its tokens before these."""
    if logprobs is None:
        return None
    return {
        "tokens": [piece_text(pieces[lp.token_id]) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [_top_texts(lp, pieces) for lp in logprobs],
        "text_offset": [offsets.add(pieces[lp.token_id]) for lp in logprobs],
    }


def _chat_token(token_id: int, logprob: float, pieces: TokenPieces) -> dict:
    piece = pieces[token_id]
    return {"token": piece_text(piece), "logprob": logprob, "bytes": list(piece)}


def chat_logprobs(logprobs: list[TokenLogprob] | None, pieces: TokenPieces) -> dict | None:
    """The Chat Completions format."""
    if logprobs is None:
        return None
    return {
        "content": [
            {**_chat_token(lp.token_id, lp.logprob, pieces), "top_logprobs": [_chat_token(t, p, pieces) for t, p in lp.top]}
            for lp in logprobs
        ]
    }


def prompt_logprobs(logprobs: list[TokenLogprob] | None, pieces: TokenPieces) -> list | None:
    """vLLM's format: None for the first prompt token, then per token {token id: {logprob,
    decoded_token}} for the token itself and the top alternatives."""
    if logprobs is None:
        return None
    entries: list[dict | None] = [None]
    for lp in logprobs:
        entries.append(
            {str(t): {"logprob": p, "decoded_token": piece_text(pieces[t])} for t, p in [(lp.token_id, lp.logprob), *lp.top]}
        )
    return entries


class Choices:
    """The choices of a non-streamed response (n per prompt): prompt p's completion i is
    choice p * n + i, its interleaved increments joined once (joining them as they came
    copied the growing text and logprobs at every one)."""

    def __init__(self, outputs: Iterable[RequestOutput], n: int, prompts: int = 1):
        parts: list[list[RequestOutput]] = [[] for _ in range(n * prompts)]
        for out in outputs:
            parts[out.index].append(out)
        whole = [RequestOutput.joined(p) if p else None for p in parts]
        self.text = [o.text if o else "" for o in whole]
        self.logprobs: list[list[TokenLogprob] | None] = [o.logprobs if o else None for o in whole]
        self.finish: list[str | None] = [finish_reason(o) if o else None for o in whole]
        self.generated = [o.generated_tokens if o else 0 for o in whole]
        self.prompt_tokens = {o.request_id: o.prompt_tokens for o in whole if o}  # per engine request: one per prompt
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * prompts
        for i, o in enumerate(whole):
            if o and o.prompt_logprobs is not None:
                self.prompt_logprobs[i // n] = o.prompt_logprobs

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens.values()), sum(self.generated))


class Progress:
    """What a stream has sent so far, per choice: whether it started, the text offsets of the
    tokens it sent log-probabilities for (the text itself may lag them, held back for a stop
    string or a character's last bytes) and tokens (usage)."""

    def __init__(self, choices: int):
        self.started = [False] * choices
        self.offsets = [TextOffsets() for _ in range(choices)]
        self.generated = [0] * choices
        self.prompt_tokens: dict[str, int] = {}  # per engine request: one per prompt

    def add(self, out: RequestOutput) -> None:
        self.started[out.index] = True
        self.generated[out.index] = out.generated_tokens
        self.prompt_tokens[out.request_id] = out.prompt_tokens

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens.values()), sum(self.generated))


class CompletionRenderer:
    """Bodies of /v1/completions: text choices with the legacy logprobs format, and vLLM's
    prompt_logprobs on each choice when asked for. n completions per prompt; choices: of
    all prompts."""

    chunk_object = "text_completion"

    def __init__(self, response_id: str, model: str, n: int, prompts: int = 1):
        self.n = n
        self.choices = n * prompts
        self.base = {"id": response_id, "object": self.chunk_object, "created": int(time.time()), "model": model}

    def chunks(self, out: RequestOutput, pieces: TokenPieces, progress: Progress) -> list[dict]:
        reason = finish_reason(out)
        if not out.text and reason is None and out.logprobs is None and out.prompt_logprobs is None:
            return []
        choice = {
            "index": out.index, "text": out.text,
            "logprobs": completion_logprobs(out.logprobs, pieces, progress.offsets[out.index]), "finish_reason": reason,
        }
        if out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs(out.prompt_logprobs, pieces)
        return [{**self.base, "choices": [choice]}]

    def whole(self, choices: Choices, pieces: TokenPieces) -> dict:
        prompts = [prompt_logprobs(logprobs, pieces) for logprobs in choices.prompt_logprobs]
        items = []
        for i in range(self.choices):
            item = {
                "index": i, "text": choices.text[i],
                "logprobs": completion_logprobs(choices.logprobs[i], pieces, TextOffsets()), "finish_reason": choices.finish[i],
            }
            if prompts[i // self.n] is not None:
                item["prompt_logprobs"] = prompts[i // self.n]
            items.append(item)
        return {**self.base, "choices": items, "usage": choices.usage()}


class ChatRenderer(CompletionRenderer):
    """Bodies of /v1/chat/completions: an assistant message (or deltas, the first naming the
    role) with the chat logprobs format."""

    chunk_object = "chat.completion.chunk"

    def chunks(self, out: RequestOutput, pieces: TokenPieces, progress: Progress) -> list[dict]:
        events = []
        if not progress.started[out.index]:
            role = {"index": out.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            events.append({**self.base, "choices": [role]})
        reason = finish_reason(out)
        if out.text or reason is not None or out.logprobs:
            choice = {
                "index": out.index, "delta": {"content": out.text} if out.text else {},
                "logprobs": chat_logprobs(out.logprobs, pieces), "finish_reason": reason,
            }
            events.append({**self.base, "choices": [choice]})
        return events

    def whole(self, choices: Choices, pieces: TokenPieces) -> dict:
        items = [
            {
                "index": i, "message": {"role": "assistant", "content": choices.text[i]},
                "logprobs": chat_logprobs(choices.logprobs[i], pieces), "finish_reason": choices.finish[i],
            }
            for i in range(self.choices)
        ]
        reply = {**self.base, "object": "chat.completion", "choices": items, "usage": choices.usage()}
        prompt = prompt_logprobs(choices.prompt_logprobs[0], pieces)
        if prompt is not None:  # vLLM's place for them in a chat completion: beside the choices
            reply["prompt_logprobs"] = prompt
        return reply
