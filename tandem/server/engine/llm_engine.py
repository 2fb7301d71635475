"""The synchronous engine: requests in, one iteration per `step()`, outputs out.

A step is: schedule -> run the model -> sample -> update sequences (stops, detokenize).
It is not thread-safe; AsyncEngine drives it from a single thread.
"""

import logging
import time
from collections.abc import Callable, Sequence as Ids
from typing import TypeVar

import torch

from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.registry import AdapterRegistry
from tandem.server.adapters.slot_pool import SlotPool, slot_dtype
from tandem.server.config import EngineConfig
from tandem.server.engine.coserve import CoServer, prior_costs
from tandem.server.engine.decode_graphs import DecodeGraphs
from tandem.server.engine.detokenizer import IncrementalDetokenizer
from tandem.server.engine.finetune_share import FinetuneShare
from tandem.server.engine.host_allocator import keep_freed_memory
from tandem.server.engine.iteration import BackwardResult, ModelRunnerOutput, SchedulerOutput, TrainingResult, TrainingWork
from tandem.server.engine.kv_cache import BlockAllocator, KVCache
from tandem.server.engine.model_runner import ModelRunner
from tandem.server.engine.outputs import EngineStats, FinishReason, ModelInfo, RequestOutput
from tandem.server.engine.sampler import Sampler, token_logprobs
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.engine.scheduler import Scheduler
from tandem.server.engine.token_histogram import ITERATION_TOKEN_BUCKETS, TokenHistogram
from tandem.server.engine.sequence import Sequence, SequenceStatus
from tandem.server.errors import InvalidRequest, ResourceExhausted, excerpt
from tandem.server.out_of_memory import out_of_memory
from tandem.server.load_phases import load_phase
from tandem.server.model.loader import LoadedModel, check_max_model_len, load_model
from tandem.server.model.lora_linear import attach_lora
from tandem.server.model.kept_activations import KeptGraph
from tandem.server.model.lora_targets import linear_shapes

log = logging.getLogger("tandem.engine")
T = TypeVar("T")


def use_device(device: torch.device) -> None:
    """Make a CUDA device the calling thread's current one. Triton launches its kernels on
    the current device whatever their tensors' device, so an engine on cuda:1 must be current
    on every thread that steps it (the constructing one here, AsyncEngine's loop at its start)."""
    torch.cuda.set_device(device)


class StepFailed(Exception):
    """An iteration raised (its cause chained): outputs are the final ones of the requests it
    carried, which were aborted."""

    def __init__(self, outputs: list[RequestOutput]):
        super().__init__(f"an iteration failed; {len(outputs)} sequences it carried were aborted")
        self.outputs = outputs


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = set(loaded.eos_token_ids)
        model = loaded.model
        shape = model.shape
        self.device = model.embed.device
        if self.device.type == "cpu":
            keep_freed_memory()
        elif self.device.type == "cuda":
            use_device(self.device)
        self.dtype = model.embed.dtype
        num_blocks = config.kv_cache_bytes // KVCache.bytes_per_block(shape, config.block_size, self.dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} is too small for one KV block of this model")
        check_max_model_len(config.max_model_len, shape.max_position)
        cache_tokens = num_blocks * config.block_size
        if config.max_model_len is not None and config.max_model_len > cache_tokens:
            # As vLLM refuses it: cut in silence, requests failed later naming a limit nobody set.
            raise ValueError(
                f"max_model_len {config.max_model_len} is more than the KV cache holds ({cache_tokens} tokens in "
                f"kv_cache_bytes={config.kv_cache_bytes}): raise --kv-cache-bytes or lower --max-model-len"
            )
        self.max_model_len = min(config.max_model_len or shape.max_position, cache_tokens)
        if self.max_model_len < shape.max_position and config.max_model_len is None:
            log.info("context limit %d tokens: the model's %d do not fit the KV cache (--kv-cache-bytes)", self.max_model_len, shape.max_position)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        attach_lora(model)
        model.prepack()
        self.registry = self._adapter_registry(model, config)
        pool = None if self.registry is None else self.registry.pool
        self.scheduler = Scheduler(config, self.allocator, pool)
        kv_cache = KVCache(shape, num_blocks, config.block_size, self.dtype, self.device)
        self.runner = ModelRunner(model, kv_cache, config.block_size, self.device, pool)
        if self.device.type == "cuda" and config.cuda_graphs:
            self.runner.graphs = DecodeGraphs(model, kv_cache, config.max_num_seqs, self.max_model_len, 0 if pool is None else pool.num_slots)
            self.runner.graphs.capture_all(self.device, None if pool is None else pool.weights)
        self.sampler = Sampler(self.device)
        self.share = FinetuneShare(config.coserve_itl_p99, config.max_num_batched_tokens, prior_costs(model))
        # When the last iteration ended, if it decoded: the next decoding one ends an
        # inter-token interval that began there (whatever ran between the two counts).
        self._decoded_at: float | None = None
        widths = {key: sum(out_slices) for key, (_, out_slices) in linear_shapes(model).items()}
        self.coserve = CoServer(
            self.allocator, shape, widths, self.share, self.dtype, self.device, config.finetune_activation_bytes
        )
        self.scheduler.reclaim = self.coserve.reclaim
        # Tokens run per kind of work since start (backward as token-layers / num_layers).
        self.iteration_tokens = {kind: 0.0 for kind in ("decode", "prefill", "train_forward", "train_head", "train_backward")}
        self.iteration_histogram = TokenHistogram(ITERATION_TOKEN_BUCKETS)
        self.info = ModelInfo(
            name=loaded.name,
            architecture=loaded.architecture,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_model_len=self.max_model_len,
            vocab_size=shape.vocab_size,
            eos_token_ids=sorted(self.eos_token_ids),
        )
        self._seqs: dict[str, Sequence] = {}
        self._groups: dict[str, list[Sequence]] = {}
        self.failures: list[tuple[str, Exception]] = []  # take_failures
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._reported: dict[str, int] = {}
        self._arrivals = 0

    def _adapter_registry(self, model, config: EngineConfig) -> AdapterRegistry | None:
        """The adapter tiers, when the server has an adapters directory."""
        if config.adapters_dir is None:
            return None
        dtype = slot_dtype(self.device, self.dtype)
        per_slot = SlotPool.slot_bytes(model, config.max_lora_rank, dtype)
        num_slots = min(config.max_loras, config.lora_pool_bytes // per_slot)
        if num_slots < 1:
            raise ValueError(
                f"one adapter slot at --max-lora-rank {config.max_lora_rank} needs {per_slot} bytes, more than "
                f"--lora-pool-bytes {config.lora_pool_bytes}: lower the rank or raise the budget"
            )
        pool = SlotPool(model, num_slots, config.max_lora_rank, dtype, self.device)
        return AdapterRegistry(
            config.adapters_dir, model, config.max_lora_rank, config.adapter_cache_bytes, pool,
            config.adapter_refresh_seconds, config.adapter_cache_prefault,
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model, config.resolve_dtype(), config.resolve_device(), config.max_model_len)
        with load_phase("engine", kv_cache_bytes=config.kv_cache_bytes):
            return cls(loaded, config)

    def validate(self, prompt_ids: Ids[int], params: SamplingParams) -> None:
        """Raise InvalidRequest for anything this request could never run with. The length
        first: a message of millions of ids is refused before any of them is read."""
        vocab = self.info.vocab_size
        params.validate(len(prompt_ids), self.max_model_len, vocab)
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")

    @property
    def capacity(self) -> int:
        """Requests the engine holds at once: running plus queued."""
        return self.config.max_num_seqs + self.config.max_waiting

    def check_capacity(self, live_requests: int) -> None:
        if live_requests >= self.capacity:
            raise ResourceExhausted(
                f"the server is at its limit of {self.capacity} concurrent requests "
                f"({self.config.max_num_seqs} running + {self.config.max_waiting} queued): retry later"
            )

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: LoRAAdapter | None = None
    ) -> None:
        """Queue a request (params.n sequences, one group named request_id); adapter is the
        version to use (from registry.get), pinned until the request ends."""
        ids = [request_id] + [f"{request_id}#{i}" for i in range(1, params.n)]
        if request_id in self._groups or any(i in self._seqs for i in ids):
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        self.check_capacity(len(self._seqs) + params.n - 1)
        first = None
        group = []
        for index, seq_id in enumerate(ids):
            seq = Sequence(
                seq_id, len(prompt_ids), list(prompt_ids), params, self._arrivals, self._generator(params, index),
                adapter, group_id=request_id, index=index, fork_of=first,
            )
            first = first or seq
            group.append(seq)
            if adapter is not None:
                self.registry.pin(adapter)
            self._arrivals += 1
            self._seqs[seq_id] = seq
            self._detok[seq_id] = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
            self._reported[seq_id] = 0
            self.scheduler.add(seq)
        self._groups[request_id] = group

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Completion index of a seeded request draws from seed + index (mod 2^64: torch's seed
        range; mod 2^63 made completion 1 of seed 2^63 - 1 draw as seed 0 does)."""
        if params.seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed((params.seed + index) % 2**64)
        return generator

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request's sequences now and free their blocks; returns their final outputs
        (none if the request is unknown or over)."""
        live = list(self._groups.get(request_id, ()))
        for seq in live:
            self.scheduler.finish(seq, FinishReason.ABORT)
        return [self._output(seq) for seq in live]

    def _fail_loads(self) -> None:
        """End the requests whose adapter could not be loaded into a slot (out of device
        memory for it, say): their errors wait in failures for the server to deliver."""
        for seq, exc in self.scheduler.failed_loads:
            if seq.status is not SequenceStatus.FINISHED:
                self.abort(seq.group)
                if out_of_memory(exc):
                    # The allocator's text stays in the log: CUDA's names the GPU's memory layout
                    # and other processes' PIDs.
                    log.error("adapter %r could not be loaded into a slot for request %s: %s", seq.adapter.name, seq.group, exc)
                    exc = ResourceExhausted(
                        f"adapter {excerpt(seq.adapter.name)} could not be loaded into a slot: out of memory on this replica: retry"
                    )
                self.failures.append((seq.group, exc))
        self.scheduler.failed_loads.clear()

    def take_failures(self) -> list[tuple[str, Exception]]:
        """(request id, error) of the requests ended since the last call for an error of their
        own (an adapter that could not be loaded), while the others went on."""
        failures, self.failures = self.failures, []
        return failures

    def abort_all(self) -> list[RequestOutput]:
        return [out for request_id in list(self._groups) for out in self.abort(request_id)]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.coserve.has_work()

    @property
    def serving(self) -> bool:
        """Whether inference requests are running or waiting."""
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: inference, plus co-served fine-tuning work within its share.

        Inference rows never enter a graph: the forward runs under inference_mode, or under
        no_grad when it carries training chunks (the activations they keep must stay usable
        by autograd); a backward slice then runs on its own, from those."""
        started = time.perf_counter()
        if not self.scheduler.running:  # nothing decoded since: an idle spell is no inter-token interval
            self._decoded_at = None
        scheduled = self.scheduler.schedule(self.share.inference_budget(len(self.scheduler.running)))
        self._fail_loads()
        scheduled_at = time.monotonic()
        # A micro-batch that fails to start (its activations not allocated) is dropped with
        # the error; the iteration's inference goes on without it.
        self._coserved(scheduled, lambda: self.coserve.plan(scheduled, len(self.scheduler.running), self._decoded_at or started, self.scheduler.kv_blocked))
        if not scheduled:
            self._decoded_at = None
            return []
        try:
            with torch.no_grad() if scheduled.train_forward is not None else torch.inference_mode():
                result = self.runner.execute(scheduled)
                # Queued after the forward and before the sampler's sync: on CUDA the adapter
                # copies for the next iterations overlap this one's compute.
                self._prefetch()
                sampled = self.sampler(result.logits, result.sampled)
                self.runner.record_top_experts()
                self._add_prompt_logprobs(result)
        except Exception as exc:
            # A micro-batch whose forward this iteration carried has moved on by it: it goes
            # too. One that only waited in the queue is untouched (an inference request's failure
            # failed a fine-tuning job that had no part in it).
            if scheduled.train_forward is not None or scheduled.train_graph is not None:
                self.coserve.abort(exc)
            # Only the requests this iteration carried: their state may be half updated. The
            # others (queued, or running but not in it) go on; failing them too turned one bad
            # step into INTERNAL for every queued request, each of which a retry would serve.
            carried = dict.fromkeys(chunk.seq.group for chunk in scheduled.inference)
            raise StepFailed([out for group in carried for out in self.abort(group)]) from exc
        trained = self._coserved(scheduled, lambda: self._train_after_forward(scheduled))
        cut = self.coserve.finish(scheduled, trained)
        self._count(scheduled)
        ended = time.perf_counter()
        interval = ended - (self._decoded_at or started) if scheduled.decodes else None
        self._decoded_at = ended if scheduled.decodes else None
        self.share.observe(ended - started, self.coserve.work(scheduled), interval, cut)
        for chunk in scheduled.inference:
            if chunk.seq.first_scheduled_at is None:
                chunk.seq.first_scheduled_at = scheduled_at
            chunk.seq.num_computed += chunk.num_tokens
        outputs = []
        for seq, token, logprob in zip(result.sampled, sampled.token_ids, sampled.logprobs):
            seq.token_ids.append(token)
            if logprob is not None:
                seq.pending_logprobs.append(logprob)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq))
        return outputs

    def _prefetch(self) -> None:
        """Load the next waiting requests' adapters ahead. Only a hint: acquire loads what is
        missing again and charges its error to its request alone (failed_loads); raised here,
        a failed load (out of memory for a slot) failed every request the iteration carried."""
        try:
            self.scheduler.prefetch()
        except Exception:
            log.warning("an adapter prefetch failed; the requests that need it load it when admitted", exc_info=True)

    def _add_prompt_logprobs(self, result: ModelRunnerOutput) -> None:
        """Append the prompt tokens' log-probabilities the forward computed to their sequences."""
        row = 0
        for seq, count in result.prompt_rows:
            first = len(seq.prompt_logprobs)
            targets = seq.token_ids[first + 1 : first + 1 + count]
            logits = result.prompt_logits[row : row + count]
            seq.prompt_logprobs.extend(token_logprobs(logits, targets, seq.params.prompt_logprobs))
            row += count

    def _train_after_forward(self, scheduled: SchedulerOutput) -> BackwardResult | KeptGraph | None:
        """The co-served work that runs after the inference forward: a micro-batch's whole
        forward with a graph, or a head block or backward slice."""
        if scheduled.train_graph is not None:
            return self.runner.forward_graph(scheduled.train_graph)
        work = scheduled.train_head or scheduled.train_backward
        return None if work is None else self.runner.backward(work)

    def _coserved(self, scheduled: SchedulerOutput, work: Callable[[], T]) -> T | None:
        """Run co-served training work that no inference row shares. Its failure (out of
        memory for a micro-batch's activations, or in a layer's replay) is the job's: the
        micro-batch is dropped with the error for its trainer, and the iteration goes on
        without it. Raised, it failed every request the iteration carried, as INTERNAL."""
        try:
            return work()
        except Exception as exc:
            log.exception("a co-served micro-batch failed; its job gets the error, inference goes on")
            self.coserve.abort(exc)
            scheduled.drop_coserved()
            return None

    def _count(self, scheduled: SchedulerOutput) -> None:
        tokens = self.iteration_tokens
        tokens["decode"] += len(scheduled.decodes)
        prefill = sum(c.num_tokens for c in scheduled.prefills)
        tokens["prefill"] += prefill
        if scheduled.decodes or prefill:
            self.iteration_histogram.observe(len(scheduled.decodes) + prefill)
        for forward in (scheduled.train_forward, scheduled.train_graph):
            if forward is not None:
                tokens["train_forward"] += forward.num_tokens
        if scheduled.train_head is not None:
            tokens["train_head"] += scheduled.train_head.num_tokens
        backward = scheduled.train_backward
        if backward is not None:
            layers = backward.last - backward.first + 1
            tokens["train_backward"] += backward.num_tokens * layers / self.runner.model.shape.num_layers

    def train(self, work: TrainingWork, loss_scale: float) -> TrainingResult:
        """Forward and backward of training sequences through the served model: gradients of
        loss_scale * (summed token loss) accumulate in the weights work.weights were built from."""
        with torch.enable_grad():
            result = self.runner.execute(SchedulerOutput(training=work))
            (result.train_loss * loss_scale).backward()
        return TrainingResult(result.train_loss.item(), result.train_targets, work.num_tokens)

    def loss(self, work: TrainingWork) -> TrainingResult:
        """The summed token loss of training sequences, no gradient (an eval pass)."""
        with torch.inference_mode():
            result = self.runner.execute(SchedulerOutput(training=work))
        return TrainingResult(result.train_loss.item(), result.train_targets, work.num_tokens)

    def stats(self) -> EngineStats:
        total = self.allocator.num_blocks
        free = self.allocator.num_free
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_queued(),
            num_free_blocks=free,
            num_total_blocks=total,
            kv_usage=(total - free) / total,
            num_preemptions=self.scheduler.num_preemptions,
            iteration_tokens=dict(self.iteration_tokens),
            finetune_share=self.share.share,
            finetune_activation_bytes=self.coserve.held_bytes,
            router_expert_tokens=dict(self.runner.router_expert_tokens),
            iteration_token_histogram=self.iteration_histogram.snapshot(),
            cache_config={
                "block_size": str(self.config.block_size),
                "cache_dtype": str(self.dtype).removeprefix("torch."),
                "num_gpu_blocks": str(total),
                "enable_prefix_caching": "False",
            },
        )

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Why seq ends with token, None if it goes on. A token that stops it (a stop token id,
        or EOS unless ignored) is in its token ids but not its text, as in vLLM: it never
        reaches the detokenizer (fed first, stop_token_ids=[id of "."] gave "Hello world.")."""
        params = seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.EOS
        if self._detok[seq.request_id].add(token):  # a stop string: the text is cut before it
            return FinishReason.STOP
        if seq.num_generated >= params.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        rid = seq.request_id
        finished = seq.finish_reason is not None
        start = self._reported[rid]
        self._reported[rid] = seq.num_generated
        params = seq.params
        logprobs = seq.pending_logprobs if params.logprobs is not None else None
        seq.pending_logprobs = []
        out = RequestOutput(
            request_id=seq.group,
            text=self._detok[rid].take(finished),
            token_ids=seq.output_ids[start:],
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            generated_tokens=seq.num_generated,
            logprobs=logprobs,
            top_experts=[seq.adapter.experts[e] for e in seq.top_experts[start:]] or None,
            first_scheduled_at=seq.first_scheduled_at,
            index=seq.index,
            prompt_logprobs=seq.prompt_logprobs if params.prompt_logprobs is not None and start == 0 and seq.index == 0 else None,
        )
        if finished:
            del self._seqs[rid], self._detok[rid], self._reported[rid]
            group = self._groups[seq.group]
            group.remove(seq)
            if not group:
                del self._groups[seq.group]
            if seq.adapter is not None:
                self.registry.unpin(seq.adapter)
        return out
