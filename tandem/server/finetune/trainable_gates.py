"""A router's gates being trained over frozen expert adapters, and how they enter a batch.

MeteoRA's recipe: the experts (LoRA adapters trained on one task each) stay frozen and only
the gates train, on the sum of the language-model loss and, for examples that carry a task
label (the expert that task calls for), a routing loss: the cross-entropy of each gated
linear's softmax over the experts against that expert, summed over the example's tokens,
averaged over the gated linears and weighed by routing_loss_weight. Examples without a label
train the gates through the language-model loss alone.

The experts sit in a small slot pool of their own (the serving pool is not touched, so
serving and this job never evict each other's slots); a training forward routes every row,
through RoutedRows.trained_delta. A finished router is published as router files
(router_format.py) and served like any router.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.router_format import DEFAULT_TOP_K, MIN_TEMPERATURE, gate_key, gates_of, router_config, router_files
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.engine.iteration import TrainingSequence, TrainingWork
from tandem.server.errors import InvalidRequest, excerpt
from tandem.server.finetune.dataset import TrainingExample
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import group_linears
from tandem.server.model.routing import RoutedRows, StepRouter


def gated_linears(spec: "RouterSpec", experts: list[LoRAAdapter]) -> list[tuple[int, str]]:
    """The (layer, group) linears every expert adapts: the ones a router gates."""
    keys = sorted(set.intersection(*(set(adapter.groups) for adapter in experts)))
    if not keys:
        raise InvalidRequest(f"experts {list(spec.experts)} adapt no linear in common: there is nothing to gate")
    return keys


@dataclass(frozen=True)
class RouterSpec:
    """What a gate-training job trains: a router over these experts (adapter names, in gate
    order), with top_k (None: DEFAULT_TOP_K, or every expert where there are fewer) and
    temperature, the routing loss weighed by routing_loss_weight."""

    experts: tuple[str, ...]
    top_k: int | None = None
    temperature: float = 1.0
    routing_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts))
        if len(set(self.experts)) != len(self.experts):
            raise InvalidRequest(f"router.experts must be distinct adapter names, got {excerpt(list(self.experts), 200)}")
        if len(self.experts) < 2:
            # One expert's weight is always 1: the language-model loss gives its gate no
            # gradient and the routing loss over one class is 0, so the job published the
            # gates it began with.
            raise InvalidRequest(
                f"router.experts names {len(self.experts)} adapter(s): gates over fewer than 2 experts have no choice to learn "
                "(serve the adapter itself, or name at least 2 experts)"
            )
        if self.top_k is None:
            object.__setattr__(self, "top_k", min(DEFAULT_TOP_K, len(self.experts)))
        if not 1 <= self.top_k <= len(self.experts):
            raise InvalidRequest(f"router.top_k must lie in [1, {len(self.experts)}] (the experts), got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            raise InvalidRequest(f"router.temperature must be a finite number >= {MIN_TEMPERATURE:g}, got {self.temperature}")
        if not (math.isfinite(self.routing_loss_weight) and self.routing_loss_weight >= 0):
            raise InvalidRequest(f"router.routing_loss_weight must be a finite number >= 0, got {self.routing_loss_weight}")

    def task_index(self, task: str) -> int:
        """The expert a task label names (-1 for none); InvalidRequest for one that is not an expert."""
        if not task:
            return -1
        if task not in self.experts:
            raise InvalidRequest(f"task {excerpt(task)} is not one of the router's experts {list(self.experts)}")
        return self.experts.index(task)


class TrainableGates(nn.Module):
    """Gate masters per gated (layer, group): gate_{layer}_{group} [num_experts, in], float32.

    experts: the expert adapters, in the spec's order; every group all of them adapt is gated.
    Gates start at zero (a uniform mixture; ties broken by expert order) unless init_std > 0.
    """

    dropout = 0.0  # the trainer's interface: gates train without lora_dropout

    def __init__(self, model: LlamaModel, experts: list[LoRAAdapter], max_rank: int, spec: RouterSpec, init_std: float = 0.0, seed: int = 0):
        super().__init__()
        if [e.name for e in experts] != list(spec.experts):
            raise ValueError("experts must be the spec's, in its order")
        self.spec = spec
        self.experts = list(experts)
        device = model.embed.device
        self.pool = SlotPool(model, len(experts), max_rank, torch.float32, device)
        self.pool.compact_slots = False
        self.expert_slots = tuple(self.pool.acquire(adapter) for adapter in experts)
        self.keys = gated_linears(spec, experts)
        generator = torch.Generator().manual_seed(seed)
        linears = group_linears(model)
        for layer, group in self.keys:
            init = torch.randn(len(experts), linears[(layer, group)].in_features, generator=generator) * init_std
            self.register_parameter(_name((layer, group)), nn.Parameter(init.to(device)))

    def gates(self) -> dict[tuple[int, str], torch.Tensor]:
        return {key: getattr(self, _name(key)) for key in self.keys}

    def work(
        self, examples: list[TrainingExample], dropout: float = 0.0, generator: torch.Generator | None = None,
        step: list[TrainingExample] | None = None,
    ) -> TrainingWork:
        """A training micro-batch: every row routed over the experts by the gates (with
        autograd), each token of a labelled example labelled with its task. The routing loss
        is routing_loss_weight x the cross-entropy of those labels, averaged over the labelled
        tokens of the step (step: its examples; None: these) and over the gated linears, as
        the language-model loss is a mean over the step's target tokens: a sum over tokens
        divided by the targets made the weight grow with the prompt's share of the tokens."""
        sequences = [TrainingSequence(e.input_ids, e.labels) for e in examples]
        rows = sum(e.num_tokens for e in examples)
        tasks = [self.spec.task_index(e.task) for e in examples]
        labels = [task for e, task in zip(examples, tasks) for _ in range(e.num_tokens)]
        router = StepRouter(self.gates(), self.expert_slots, self.spec.top_k, self.spec.temperature)
        labelled = sum(e.num_tokens for e in (examples if step is None else step) if e.task)
        aux_scale = self.spec.routing_loss_weight / max(labelled, 1) / len(self.keys)
        routing = RoutedRows.build(
            [router], [0] * rows, list(range(rows)), self.pool.device, labels if any(t >= 0 for t in tasks) else None, aux_scale,
        )
        return TrainingWork(sequences, self.pool.weights, dropout, generator, routing)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def files(self) -> dict[str, bytes]:
        """The router's files as they stand (router_format.py): what a checkpoint and a publish write."""
        config = router_config(list(self.spec.experts), self.spec.top_k, self.spec.temperature)
        return router_files(config, {key: g.detach() for key, g in self.gates().items()})

    def load_gate_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the gates from a checkpoint's gate tensors."""
        saved = gates_of(tensors)
        with torch.no_grad():
            for key, gate in self.gates().items():
                if key not in saved:
                    raise ValueError(f"the checkpoint has no {gate_key(*key)}")
                gate.copy_(saved[key])


def _name(key: tuple[int, str]) -> str:
    return f"gate_{key[0]}_{key[1]}"
