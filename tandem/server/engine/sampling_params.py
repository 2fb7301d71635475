"""Per-request sampling options and their validation."""

from dataclasses import dataclass, field

from tandem.server.errors import ContextLengthExceeded, InvalidRequest

MAX_LOGPROBS = 20
# Completions of one prompt per request: each holds its own KV blocks once forked.
MAX_N = 16
# gRPC's top_k is a uint32; HTTP's JSON integers have no bound of their own.
MAX_TOP_K = 2**32 - 1
# OpenAI's range for presence and frequency penalties.
MAX_PENALTY = 2.0
# Stop lists are matched at every token: their size is bounded so one request cannot slow
# every batch it shares. OpenAI allows 4 strings; some users need more.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
# Below this temperature, logits / temperature can overflow float32 (NaN probabilities that
# always sample token 0); such temperatures are as good as greedy anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 (or any below GREEDY_BELOW_TEMPERATURE) means greedy. top_k 0, top_p 1 and
    min_p 0 switch those filters off; min_p drops tokens less likely than min_p times the
    most likely one (after temperature).
    presence_penalty / frequency_penalty (OpenAI's) subtract from a token's logit once if it
    was generated, and once per time it was generated; repetition_penalty (CTRL's) divides
    the logits of every token of the prompt and the output.
    n: completions of the prompt; they share its prefill (the first computes the prompt, the
    others copy its KV blocks). seed makes sampling reproducible whatever else shares the
    batch; completion i draws from seed + i.
    logprobs None returns none; 0 returns the sampled token's log-probability; N > 0 adds
    the N most likely tokens at each step (raw model distribution, before any filtering).
    prompt_logprobs likewise for every prompt token after the first (first completion only).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # max_new_tokens is the front's default, not the caller's ask (max_tokens / max_new_tokens
    # left out): a prompt that leaves less room generates to the context's end, as OpenAI's
    # and vLLM's servers do, instead of being refused over a number the caller never sent.
    default_max_new_tokens: bool = False
    # What the caller named max_new_tokens (the OpenAI front: max_tokens or
    # max_completion_tokens), for the errors that name it.
    max_new_tokens_field: str = "max_new_tokens"

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def check_n(self) -> None:
        """n alone: a batch of prompts is sized by it before any prompt is validated."""
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}")

    def validate(self, prompt_len: int, max_model_len: int, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first bad field and its allowed range."""
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty: send at least one token")
        if prompt_len >= max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {prompt_len} tokens but the maximum context length is {max_model_len} "
                "(with room for one new token): shorten the prompt"
            )
        if self.max_new_tokens < 1:
            raise InvalidRequest(f"{self.max_new_tokens_field} must be at least 1, got {self.max_new_tokens}")
        if prompt_len + self.max_new_tokens > max_model_len and not self.default_max_new_tokens:
            raise ContextLengthExceeded(
                f"prompt ({prompt_len} tokens) + {self.max_new_tokens_field} ({self.max_new_tokens}) exceeds the "
                f"maximum context length of {max_model_len}: ask for at most {max_model_len - prompt_len} new tokens"
            )
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be in [0, {MAX_TOP_K}] (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in [0, 1] (0 keeps the top token only), got {self.top_p}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise InvalidRequest(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        self.check_n()
        # The gRPC field is a uint64, OpenAI's a signed integer: either 64-bit range.
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be a 64-bit integer, in [-2^63, 2^64), got {self.seed}")
        self._validate_stops()
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop strings may have at most {MAX_STOP_CHARS} characters; one has {longest}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed"
            )
