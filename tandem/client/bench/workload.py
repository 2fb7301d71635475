"""The requests of a run: prompts paired with adapters, output lengths and sampling settings."""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tandem.client.bench.popularity import AdapterPopularity
from tandem.client.bench.prompts import Prompt
from tandem.client.types import SamplingOptions


@dataclass(frozen=True)
class BenchRequest:
    """One request as it is sent: prompt, adapter ("" = base) and sampling options."""

    prompt: Prompt
    adapter: str
    options: SamplingOptions = field(default_factory=dict)  # type: ignore[assignment]

    def stream_kwargs(self) -> dict:
        return {"adapter": self.adapter, **self.prompt.request_fields(), **self.options}


def build_requests(prompts: list[Prompt], popularity: AdapterPopularity, count: int, rng: np.random.Generator,
                   output_len: int | None, ignore_eos: bool, sampling: SamplingOptions) -> list[BenchRequest]:
    """`count` requests over the prompts in a random order (cycled when there are fewer);
    output_len None takes each prompt's dataset length."""
    if not prompts:
        raise ValueError("the workload has no prompts")
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(-(-count // len(prompts)))])[:count]
    adapters = popularity.draw(count, rng)
    requests = []
    for index, adapter in zip(order, adapters):
        prompt = prompts[index]
        max_new_tokens = output_len if output_len is not None else prompt.output_len
        if max_new_tokens is None:
            raise ValueError("the dataset has no output lengths: give --output-len N")
        options: SamplingOptions = {**sampling, "max_new_tokens": int(max_new_tokens)}
        if ignore_eos:
            options["ignore_eos"] = True
        requests.append(BenchRequest(prompt, adapter, options))
    return requests


def cycle(requests: list[BenchRequest]) -> Iterator[BenchRequest]:
    """Requests for a run bounded by time rather than count: the list over and over."""
    return itertools.cycle(requests)
