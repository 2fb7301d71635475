"""Turn next-token logits into tokens, one row per sequence, with per-row options.

All rows are processed together; only seeded rows draw their noise from their own
generator, so a seeded request samples the same tokens whatever else is in the batch.
Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which equals drawing
from p and needs one noise vector per row.
"""

from dataclasses import dataclass

import torch

from tandem.server.engine.outputs import TokenLogprob
from tandem.server.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    """token_ids: [N] chosen tokens; logprobs: per row, None unless the request asked."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None):
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [N, vocab] float32, row i belongs to seqs[i]."""
        raw = logits
        logits = self._penalize(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._sample(logits, seqs, greedy)
        token_ids = chosen.tolist()
        return SamplerOutput(token_ids, _logprobs(raw, seqs, token_ids))

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Repetition penalty (CTRL / transformers style) over prompt and output tokens, then
        presence and frequency penalties (OpenAI's) over output tokens."""
        repeated = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        counted = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        if not repeated and not counted:
            return logits
        logits = logits.clone()
        for i in repeated:
            ids = torch.tensor(seqs[i].token_ids, device=logits.device).unique()
            penalty = seqs[i].params.repetition_penalty
            picked = logits[i, ids]
            # Clamped: a penalty near 0 (or huge) took a logit to +-inf, and the softmax of a
            # row holding +inf is NaN, which sampled token 0 whatever the logits.
            finite = torch.finfo(logits.dtype).max
            logits[i, ids] = torch.where(picked < 0, picked * penalty, picked / penalty).clamp(-finite, finite)
        for i in counted:
            params = seqs[i].params
            output = torch.tensor(seqs[i].output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(output, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        device = logits.device
        temps = torch.tensor([1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)], device=device)
        scaled = logits / temps[:, None]
        # vLLM's order: temperature, min_p, then top-k / top-p over what min_p left.
        min_p = [s.params.min_p for s in seqs]
        if any(min_p):
            scaled = _filter_min_p(scaled, torch.tensor(min_p, device=device, dtype=scaled.dtype))
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(
                generator=self.generator
            )
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(torch.tensor(greedy, device=device), logits.argmax(dim=-1), sampled)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf, as vLLM does: top-k keeps
    every token tied with the k-th largest; top-p cuts a token once the tokens above it cover
    top_p, summed from the least likely up (the top token always stays). A row with top_p 1
    is left whole: summed from the top, a float32 softmax over a large vocabulary passes 1.0
    before its tail (1 + 1.3e-5 over 128k tokens), which cut tens of thousands of tokens from
    rows that asked for no nucleus."""
    vocab = logits.shape[1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1)
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=device)
    remove = sorted_logits < sorted_logits.gather(1, (vocab - k)[:, None])
    p = torch.tensor(top_p, device=device, dtype=logits.dtype)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    remove |= (probs.cumsum(dim=-1) <= 1 - p[:, None]) & (p < 1)[:, None]
    remove[:, -1] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))


def _filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits whose probability is below min_p [N] times the row's largest."""
    probs = torch.softmax(logits, dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < floor, float("-inf"))


def _logprobs(raw: torch.Tensor, seqs: list[Sequence], token_ids: list[int]) -> list[TokenLogprob | None]:
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    for i in rows:
        out[i] = token_logprobs(raw[i : i + 1], [token_ids[i]], seqs[i].params.logprobs)[0]
    return out


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """logits [N, vocab] (raw, before any penalty or filter): each row's log-probability of
    token_ids[row] and, when top > 0, its `top` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, p) for t, p in zip(token_ids, chosen)]
    values, ids = logp.topk(top, dim=-1)
    return [
        TokenLogprob(t, p, list(zip(i, v))) for t, p, i, v in zip(token_ids, chosen, ids.tolist(), values.tolist())
    ]
