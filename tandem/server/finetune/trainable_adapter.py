"""The float32 master weights of one adapter being trained, and how they enter a batch.

Masters are kept in PEFT's shapes (A [r, in], B [out, r] per projection), so a checkpoint
is a PEFT adapter as it stands. Each iteration builds the fused slot layout the kernels read
(server/model/lora_targets.py: q/k/v and gate/up share one shrink) from them with autograd,
scale folded into B as a serving slot holds it; the gradient flows back into the masters.
Inference never reads the masters: a finished version is published as files and served
from a slot like any other adapter.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels.lora import LoRAWeights
from tandem.server.adapters.compeft_format import dense_slices
from tandem.server.adapters.lora_init import draw_order, initial_a
from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.engine.iteration import TrainingSequence, TrainingWork
from tandem.server.errors import IncompatibleAdapter, InvalidRequest, excerpt
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import TARGET_SLICES, TARGETS, group_linears, module_path, target_of


@dataclass(frozen=True)
class LoRASpec:
    """PEFT's LoRA settings of an adapter to train (names as in peft.LoraConfig); lora_alpha
    None is 2 * r."""

    r: int = 16
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = TARGETS
    use_rslora: bool = False
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InvalidRequest(f"lora.r must be at least 1, got {self.r}")
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", 2.0 * self.r)
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise InvalidRequest(f"lora.lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        unknown = sorted(set(self.target_modules) - set(TARGETS))
        if unknown or not self.target_modules:
            raise InvalidRequest(
                f"lora.target_modules must be a non-empty subset of {', '.join(TARGETS)}; got {excerpt(list(self.target_modules), 200)}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidRequest(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        object.__setattr__(self, "target_modules", tuple(t for t in TARGETS if t in self.target_modules))

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class TrainableAdapter(nn.Module):
    """Master weights per (layer, target): a_{layer}_{target} [r, in], b_... [out, r], float32."""

    def __init__(self, model: LlamaModel, spec: LoRASpec, seed: int):
        super().__init__()
        self.spec = spec
        self.num_layers = len(model.layers)
        self._linears = group_linears(model)
        device = model.embed.device
        # PEFT's init (lora_init.py), drawn from the seed; a compressed copy redraws it.
        self.a_init_seed: int | None = seed
        modules = draw_order((layer, target) for layer in range(self.num_layers) for target in spec.target_modules)
        shapes = [(spec.r, self._linears[(layer, TARGET_SLICES[target][0])].in_features) for layer, target in modules]
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for (layer, target), a in zip(modules, initial_a(shapes, seed)):
            group, s = TARGET_SLICES[target]
            self.a[_name(layer, target)] = nn.Parameter(a.to(device))
            self.b[_name(layer, target)] = nn.Parameter(torch.zeros(self._linears[(layer, group)].out_slices[s], spec.r, device=device))
        self._groups = {TARGET_SLICES[t][0] for t in spec.target_modules}
        self._slots: dict[tuple[int, str], LoRAWeights] | None = None
        self._slot_versions: list[int] = []

    @classmethod
    def from_adapter(cls, model: LlamaModel, adapter: LoRAAdapter, lora_dropout: float) -> "TrainableAdapter":
        """Continue training a served adapter: same rank, targets and scale, its weights as the
        start. Its A is still its trainer's draw plus what training moved (same shapes, same
        draw order), so the continuation keeps the adapter's init seed for a compress."""
        trainable = cls(model, spec_of(adapter, lora_dropout, len(model.layers)), seed=0)
        trainable.a_init_seed = adapter.a_init_seed
        with torch.no_grad():
            for ((layer, group), s), (a, b) in dense_slices(adapter).items():  # a compressed adapter unpacks here
                name = _name(layer, target_of(layer, group, s))
                trainable.a[name].copy_(a)
                trainable.b[name].copy_(b)
        return trainable

    def slot_weights(self) -> dict[tuple[int, str], LoRAWeights]:
        """The masters as one slot per adapted group: a [1, S * r, in], b [1, N, r] (scaled);
        slices the spec does not target are zero and get no gradient.

        Built once per version of the masters (an optimizer step or a restore changes them in
        place), not per micro-batch: the slots are leaves of their own, and a hook moves each
        gradient that reaches them into the masters' .grad, as autograd through the fusing
        would (a slice of a, b's rows times the scale)."""
        versions = [p._version for p in self.parameters()]
        if self._slots is None or versions != self._slot_versions:
            with torch.no_grad():
                self._slots = {key: self._fuse(key, linear) for key, linear in self._linears.items() if key[1] in self._groups}
            self._slot_versions = versions
        return self._slots

    def _fuse(self, key: tuple[int, str], linear) -> LoRAWeights:
        """The slot of one group, its leaves hooked to hand their gradients to the masters."""
        layer, group = key
        r, scale = self.spec.r, self.spec.scale
        a_parts, b_parts, masters = [], [], []
        row = 0
        for s, width in enumerate(linear.out_slices):
            name = _name(layer, target_of(layer, group, s))
            if name in self.a:
                a_parts.append(self.a[name])
                b_parts.append(self.b[name] * scale)
                masters.append((name, slice(s * r, (s + 1) * r), slice(row, row + width)))
            else:
                a_parts.append(self._zeros(r, linear.in_features))
                b_parts.append(self._zeros(width, r))
            row += width
        a = torch.cat(a_parts).unsqueeze(0).requires_grad_()
        # b [1, N, r] laid out as its transpose, the CPU slot pool's layout: a co-served
        # forward chunk (no graph) then runs the C kernel rather than the torch reference.
        b = torch.cat(b_parts).t().contiguous().t().unsqueeze(0).requires_grad_()
        a_parts = [(self.a[n], rows) for n, rows, _ in masters]
        b_parts = [(self.b[n], rows) for n, _, rows in masters]
        a.register_post_accumulate_grad_hook(lambda leaf: _to_masters(leaf, a_parts, 1.0))
        b.register_post_accumulate_grad_hook(lambda leaf: _to_masters(leaf, b_parts, scale))
        ranks = torch.full((1,), r, dtype=torch.int32, device=a.device)
        return LoRAWeights(a, b, ranks, linear.out_slices, [r])

    @property
    def dropout(self) -> float:
        return self.spec.lora_dropout

    def work(self, examples: list, dropout: float = 0.0, generator: torch.Generator | None = None, step: list | None = None) -> TrainingWork:
        """A training micro-batch of these examples on this adapter (step, the whole step's
        examples: unused here; the trainer scales the loss)."""
        sequences = [TrainingSequence(e.input_ids, e.labels) for e in examples]
        return TrainingWork(sequences, self.slot_weights(), dropout, generator)

    def _zeros(self, rows: int, cols: int) -> torch.Tensor:
        return torch.zeros(rows, cols, device=next(iter(self.a.values())).device)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under PEFT's safetensors keys (B unscaled, as PEFT stores it)."""
        out = {}
        for name in self.a:
            layer, target = _parse_name(name)
            prefix = f"base_model.model.{module_path(layer, target)}"
            out[f"{prefix}.lora_A.weight"] = self.a[name].detach()
            out[f"{prefix}.lora_B.weight"] = self.b[name].detach()
        return out

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore weights saved by peft_tensors (a checkpoint)."""
        with torch.no_grad():
            for key, value in self.peft_tensors().items():
                value.copy_(tensors[key])

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())


def _to_masters(leaf: torch.Tensor, parts: list[tuple[nn.Parameter, slice]], scale: float) -> None:
    """Add each master's rows of a slot's gradient (times scale) to its .grad; clear the slot's."""
    grad = leaf.grad[0]
    leaf.grad = None
    for master, rows in parts:
        # Contiguous, as the masters are: the fused AdamW on CPU reads a gradient in memory
        # order whatever its strides (torch 2.13), and b's slot is laid out transposed.
        part = (grad[rows] * scale).contiguous()
        if master.grad is None:
            master.grad = part
        else:
            master.grad += part


def spec_of(adapter: LoRAAdapter, lora_dropout: float, num_layers: int) -> LoRASpec:
    """The LoRA settings to continue training a served adapter with; refuses adapters whose
    projections differ in rank or scale (rank_pattern / alpha_pattern), and those that adapt a
    projection on some layers only (layers_to_transform / exclude_modules): trained further,
    every layer's would have been trained from a fresh start and published beside them."""
    slices = [(layer, group, s, a.shape[0], scale) for (layer, group), g in adapter.groups.items() for s, (a, _, scale) in g.slices.items()]
    ranks = {r for *_, r, _ in slices}
    scales = {scale for *_, scale in slices}
    if len(ranks) != 1 or len(scales) != 1:
        raise IncompatibleAdapter(
            f"adapter {adapter.name!r} has several ranks or scales (rank_pattern / alpha_pattern); "
            "only adapters with one rank and one alpha can be trained further"
        )
    r, scale = ranks.pop(), scales.pop()
    targets = {target_of(layer, group, s) for layer, group, s, *_ in slices}
    adapted = {(layer, target_of(layer, group, s)) for layer, group, s, *_ in slices}
    missing = sorted({(layer, t) for layer in range(num_layers) for t in targets} - adapted, key=lambda m: (m[0], TARGETS.index(m[1])))
    if missing:
        layer, target = missing[0]
        raise IncompatibleAdapter(
            f"adapter {adapter.name!r} adapts {target} on some layers only (not layer {layer}: layers_to_transform or "
            "exclude_modules); only adapters that adapt each of their projections on every layer can be trained further"
        )
    alpha, rslora = _stated_alpha(adapter, r, scale)
    return LoRASpec(r=r, lora_alpha=alpha, target_modules=tuple(targets), use_rslora=rslora, lora_dropout=lora_dropout)


def _stated_alpha(adapter: LoRAAdapter, r: int, scale: float) -> tuple[float, bool]:
    """lora_alpha and use_rslora as the adapter's config states them, where they give its
    scale: derived back from the scale, alpha came out as 29.000000000000004 for 29 at r 7,
    and an rsLoRA adapter's as a plain one's. Else (an alpha_pattern that covers every
    projection) alpha is derived from the scale with the plain rule."""
    alpha, rslora = adapter.config.get("lora_alpha"), bool(adapter.config.get("use_rslora"))
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if math.isclose(alpha / (math.sqrt(r) if rslora else r), scale):
            return alpha, rslora
    return scale * r, False


def _name(layer: int, target: str) -> str:
    return f"{layer}_{target}"


def _parse_name(name: str) -> tuple[int, str]:
    layer, target = name.split("_", 1)
    return int(layer), target
