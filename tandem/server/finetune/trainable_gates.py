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

import torch
from torch import nn

from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.router_format import DEFAULT_TOP_K, router_config
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.engine.iteration import TrainingSequence, TrainingWork
from tandem.server.errors import InvalidRequest
from tandem.server.finetune.dataset import TrainingExample
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import group_linears
from tandem.server.model.routing import RoutedRows, StepRouter


class TrainableGates(nn.Module):
    """Gate masters per gated (layer, group): gate_{layer}_{group} [num_experts, in], float32.

    experts: the expert adapters, in gate order; every group all of them adapt is gated.
    Gates start at zero (a uniform mixture; ties broken by expert order) unless init_std > 0.
    """

    def __init__(
        self, model: LlamaModel, experts: list[LoRAAdapter], max_rank: int, top_k: int = DEFAULT_TOP_K,
        temperature: float = 1.0, routing_loss_weight: float = 1.0, init_std: float = 0.0, seed: int = 0,
    ):
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise InvalidRequest(f"top_k must lie in [1, {len(experts)}] (the experts), got {top_k}")
        if not temperature > 0 or routing_loss_weight < 0:
            raise InvalidRequest("temperature must be > 0 and routing_loss_weight >= 0")
        self.experts = list(experts)
        self.top_k, self.temperature, self.routing_loss_weight = top_k, temperature, routing_loss_weight
        device = model.embed.device
        self.pool = SlotPool(model, len(experts), max_rank, torch.float32, device)
        self.pool.compact_slots = False
        self.expert_slots = tuple(self.pool.acquire(adapter) for adapter in experts)
        shared = set.intersection(*(set(adapter.groups) for adapter in experts))
        generator = torch.Generator().manual_seed(seed)
        self.keys = sorted(shared)
        if not self.keys:
            raise InvalidRequest("the experts adapt no linear in common: there is nothing to gate")
        linears = group_linears(model)
        for layer, group in self.keys:
            init = torch.randn(len(experts), linears[(layer, group)].in_features, generator=generator) * init_std
            self.register_parameter(_name((layer, group)), nn.Parameter(init.to(device)))

    def gates(self) -> dict[tuple[int, str], torch.Tensor]:
        return {key: getattr(self, _name(key)) for key in self.keys}

    def work(
        self, examples: list[TrainingExample], tasks: list[int], loss_scale: float, dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> TrainingWork:
        """A training micro-batch: every row routed over the experts by the gates (with
        autograd). tasks[i]: the expert example i's task calls for, -1 = unlabelled;
        loss_scale: what the trainer scales this micro-batch's summed token loss by."""
        sequences = [TrainingSequence(e.input_ids, e.labels) for e in examples]
        rows = sum(e.num_tokens for e in examples)
        labels = [task for e, task in zip(examples, tasks) for _ in range(e.num_tokens)]
        router = StepRouter(self.gates(), self.expert_slots, self.top_k, self.temperature)
        aux_scale = self.routing_loss_weight * loss_scale / len(self.keys)
        routing = RoutedRows.build(
            [router], [0] * rows, list(range(rows)), self.pool.device, labels if any(t >= 0 for t in tasks) else None, aux_scale,
        )
        return TrainingWork(sequences, self.pool.weights, dropout, generator, routing)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def router_files(self) -> tuple[dict, dict[tuple[int, str], torch.Tensor]]:
        """The router_config.json fields and the gates, as write_router takes them."""
        config = router_config([e.name for e in self.experts], self.top_k, self.temperature)
        return config, {key: g.detach().cpu() for key, g in self.gates().items()}


def task_index(experts: list[str], task: str) -> int:
    """The expert index a task label names (-1 for no label); InvalidRequest for an unknown one."""
    if not task:
        return -1
    if task not in experts:
        raise InvalidRequest(f"task {task!r} is not one of the router's experts {experts}")
    return experts.index(task)


def _name(key: tuple[int, str]) -> str:
    return f"gate_{key[0]}_{key[1]}"
