"""The one place configuration lives.

Every knob of the process is a field here. The CLI (server/cli.py) builds these objects
from flags and their `TANDEM_*` environment twins; besides it only the native kernels' build
(tandem/kernels/native_build.py: TANDEM_CACHE_DIR, TANDEM_NATIVE_*) reads the environment.
"""

import os
import re
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FINETUNE_MODES = ("coserve", "timeslice")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# gRPC's message size options are C ints.
MAX_MESSAGE_BYTES = 2**31 - 1


@dataclass
class EngineConfig:
    """What the engine needs to load a model and size its caches and batches.

    model: a Hugging Face directory, a .gguf file, or None for the embedded SmolLM2.
    dtype: "auto" picks bfloat16 (CPU with bf16 units, or CUDA), else float32.
    kv_cache_bytes: memory budget for the paged KV cache (all layers, K and V).
    max_num_batched_tokens: token budget of one iteration (decode + prefill chunks).
    max_num_seqs: cap on sequences running at once.
    max_waiting: cap on queued requests; beyond it submissions are refused at once.
    max_model_len: context limit (prompt + generated); None = the model's own limit.
    adapters_dir: directory of PEFT adapters, one folder per name; None serves no adapters.
    max_lora_rank: largest adapter rank accepted; slot storage is padded to it.
    max_loras: device slots, i.e. distinct adapters in one iteration, capped by lora_pool_bytes.
    adapter_cache_bytes: host-memory budget for parsed adapters (LRU, in-use ones pinned).
    adapter_cache_prefault: touch that whole budget at start (one pass, ~0.3-9 s for 2 GiB
        on our VMs), so that no adapter read while serving pays page faults (they made a
        20 MB read 50-140 ms instead of ~20); False grows it as reads need it.
    adapter_refresh_seconds: how often a cached adapter's files are checked (one stat each,
        when a request names it) for a new version another process published; 0 = every request.
    data_dir: where fine-tuning jobs read training files and keep their state; None turns
        fine-tuning off (it also needs adapters_dir, where trained adapters are published).
    max_training_file_bytes: the largest dataset a fine-tuning job accepts.
    max_active_jobs: fine-tuning jobs queued or running at once (each holds its parsed
        dataset in memory, ~10 bytes a token); CreateJob past it is RESOURCE_EXHAUSTED.
    finetune_mode: "coserve" runs training tokens inside the inference iterations (forward
        chunks, then backward slices of a few layers, within a share of the token budget);
        "timeslice" runs one training micro-batch between inference iterations.
    coserve_itl_p99: the inter-token latency target (seconds) that steers co-served
        fine-tuning's share of each iteration; None keeps the share fixed at one half.
    finetune_micro_batch_tokens: training tokens whose gradients are computed together (a
        step of more tokens accumulates several). Co-served, it bounds the memory training
        holds (its KV blocks and kept activations); time-sliced, how long inference waits.
    finetune_activation_bytes: the most memory a co-served micro-batch's kept activations
        (each layer's input and frozen linears' outputs for its rows, and the gradient at the
        top) may take; its KV blocks come from the free list only, never from inference's.
        Micro-batches are cut to fit; a co-served job with a longer example is refused. A
        micro-batch that starts with no inference running keeps its forward's graphs as well
        where both fit under it (a time-sliced step's cost instead of a replay).
    timeslice_share: time-sliced mode only, the most of the engine's time training takes
        while inference has work: a micro-batch of t seconds is followed by at least
        t x (1 - share) / share of inference alone. 1.0 runs one after every inference
        iteration; lower shares trade training throughput for inference latency.
    stream_interval: tokens per streamed message after a completion's first (sent at once)
        and until its last (sent when it ends), as vLLM's and SGLang's --stream-interval: 1
        streams every token; more send fewer messages, each costing the event loop and the
        client far more than its tokens, at that many tokens' delay between messages.
    cuda_graphs: on CUDA, capture decode forwards as CUDA graphs per batch-size bucket and
        replay them (engine/decode_graphs.py); False launches every op of every step.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_waiting: int = 1024
    max_model_len: int | None = None
    num_threads: int | None = None
    adapters_dir: str | None = None
    max_lora_rank: int = 256
    max_loras: int = 8
    lora_pool_bytes: int = 4 << 30
    adapter_cache_bytes: int = 2 << 30
    adapter_cache_prefault: bool = True
    adapter_refresh_seconds: float = 2.0
    data_dir: str | None = None
    max_training_file_bytes: int = 256 << 20
    max_active_jobs: int = 8
    finetune_mode: str = "coserve"
    coserve_itl_p99: float | None = None
    finetune_micro_batch_tokens: int = 512
    finetune_activation_bytes: int = 4 << 30
    timeslice_share: float = 1.0
    stream_interval: int = 1
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        refuse_empty_paths(self, ("model", "adapters_dir", "data_dir"))
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        # A missing directory may be a volume still being filled (the registry warns); a file never serves.
        if self.adapters_dir is not None and os.path.exists(self.adapters_dir) and not os.path.isdir(self.adapters_dir):
            raise ValueError(f"--adapters-dir {self.adapters_dir} is not a directory: give the directory that holds one folder per adapter")
        if self.data_dir is not None and os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
            # Checked here, before the model loads: it failed after the load, a bare OSError naming no flag.
            raise ValueError(f"--data-dir {self.data_dir} is not a directory: give the directory fine-tuning keeps its files in")
        for name in (
            "block_size", "kv_cache_bytes", "max_num_batched_tokens", "max_num_seqs", "max_waiting",
            "max_lora_rank", "max_loras", "lora_pool_bytes", "adapter_cache_bytes", "max_training_file_bytes", "max_active_jobs",
            "finetune_micro_batch_tokens", "finetune_activation_bytes", "stream_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_model_len", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {', '.join(FINETUNE_MODES)}, got {self.finetune_mode!r}")
        if not self.adapter_refresh_seconds >= 0:
            raise ValueError(f"adapter_refresh_seconds must be >= 0, got {self.adapter_refresh_seconds}")
        if self.coserve_itl_p99 is not None and not self.coserve_itl_p99 > 0:
            raise ValueError(f"coserve_itl_p99 must be a positive number of seconds, got {self.coserve_itl_p99}")
        if not 0 < self.timeslice_share <= 1:
            raise ValueError(f"timeslice_share must be in (0, 1], got {self.timeslice_share}")
        if self.data_dir is not None and self.adapters_dir is None:
            raise ValueError("--data-dir (fine-tuning) needs --adapters-dir too: trained adapters are published there")

    def resolve_device(self) -> torch.device:
        """The device, checked against this host: a GPU index it lacks failed at the first
        allocation, after the server was listening, with CUDA's "invalid device ordinal"."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} asked for, but this torch has no CUDA or sees no GPU: use --device cpu or auto")
        device = torch.device(self.device)
        if device.index is not None and device.index >= (count := torch.cuda.device_count()):
            raise ValueError(f"--device {self.device}: this host sees {count} GPU(s), so N in cuda:N must be below {count}")
        return device

    def resolve_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.resolve_device()
        if device.type == "cuda":
            # Below compute capability 8 (T4, V100) bfloat16 is emulated: float16, as vLLM picks there.
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32


def refuse_empty_paths(config: object, names: tuple[str, ...]) -> None:
    """An empty path is an error, not "unset": `TANDEM_AUTH_TOKENS_FILE=` (an env file's empty
    line, a template's missing value) ran the server with authentication off, every call
    admin; an empty adapters or data directory was the working directory."""
    for name in names:
        if getattr(config, name) == "":
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} is empty ({flag} '' or TANDEM_{name.upper()}= set to nothing): give a path, or leave it unset")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there bf16 is the faster dtype."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class ServerConfig:
    """What the gRPC server needs beyond the engine: addresses, security, limits, drain.

    port / metrics_port: 0 picks a free port (tests use it).
    http_port: the OpenAI-compatible HTTP front's port (0 picks a free one); None turns it off.
    auth_tokens_file: lines "<role> <token>" (role inference or admin); None = no auth.
    tls_cert / tls_key: PEM files that turn TLS on, for gRPC only; tls_client_ca also requires
    and checks client certificates (mutual TLS), so it needs auth_tokens_file or http_port None:
    the plaintext HTTP front would serve anyone.
    drain_grace_seconds: how long in-flight requests may run after SIGTERM.
    """

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090
    http_port: int | None = 8000
    auth_tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_message_bytes: int = 4 << 20
    drain_grace_seconds: float = 30.0
    log_format: str = "json"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        refuse_empty_paths(self, ("auth_tokens_file", "tls_cert", "tls_key", "tls_client_ca"))
        if self.host.startswith("["):
            raise ValueError(f"host is an address without brackets (an IPv6 one as ::1 or ::), got {self.host!r}")
        for name in ("port", "metrics_port", "http_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        taken = [p for p in (self.port, self.metrics_port, self.http_port) if p]  # 0: a free one each
        if len(set(taken)) < len(taken):
            raise ValueError(
                f"port {self.port}, metrics_port {self.metrics_port} and http_port {self.http_port} must differ: each serves its own listener"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        if self.tls_client_ca is not None and self.http_port is not None and self.auth_tokens_file is None:
            raise ValueError(
                "--tls-client-ca (mutual TLS) checks gRPC clients only: the HTTP front (plaintext, --http-port "
                f"{self.http_port}) would serve anyone; turn it off with --http-port off, or require tokens with --auth-tokens-file"
            )
        if not 0 < self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be in [1, {MAX_MESSAGE_BYTES}] (gRPC's limit), got {self.max_message_bytes}")
        if not self.drain_grace_seconds >= 0:
            raise ValueError(f"drain_grace_seconds must be >= 0, got {self.drain_grace_seconds}")
        if self.log_format not in ("json", "text"):
            raise ValueError(f"log_format must be json or text, got {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
