"""Engine settings, validated once at start and frozen."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

# Switches between kernel paths, for benchmarks, tests and bisecting a numeric difference (not
# server settings: no flag sets them). Read here, the one module below the CLI that reads the
# environment; the kernels and models ask `kernel_switch`.
KERNEL_SWITCHES = {
    "FREELUNCH_CPU_LINEAR": "panel",  # float32 linears: panel (our C kernels), onednn, torch
    "FREELUNCH_CPU_ATTENTION": "kernel",  # few-query attention: kernel (C), sdpa
    "FREELUNCH_CPU_ELEMENTWISE": "kernel",  # RMSNorm, RoPE, SwiGLU's gate: kernel (C), torch
    "FREELUNCH_CPU_DECODER": "stack",  # a step's layers: stack (one C call where it serves), layers
    "FREELUNCH_INT8_KERNEL": "",  # the integer-activation variant; "": the best the CPU has
    "CC": "",  # the C compiler that builds the kernels; "": gcc, else cc
}


def kernel_switch(name: str) -> str:
    return os.environ.get(name, KERNEL_SWITCHES[name])


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # folder or .gguf; None = the embedded default model
    served_model_name: str | None = None
    dtype: str = "auto"
    # weight-only (models/quantization.py): auto (gguf for a .gguf model on CPU, else none), none, int8, int4, gguf
    quantization: str = "auto"
    # quantised layers' inputs (models/quantization.py): auto, float, or int8 (blocks of 32, integer dot products)
    activations: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # None = the model's max_position_embeddings (capped at 8192)
    max_num_seqs: int = 64  # batch rows at once
    # tokens per forward (prefill chunks are cut to fit); None: 1024 on the native engine, vLLM's own
    # default (larger on GPUs) on vllm
    max_num_batched_tokens: int | None = None
    scheduling_policy: str = "fair"  # "fair" or "fifo" (engine/scheduler.py)
    # a request's rows may make a step cost at most this many one-token decode steps (draft trees)
    max_step_cost: float = 2.0
    # fair policy: prompt tokens a request prefills per step while other requests decode
    long_prefill_token_threshold: int = 256
    block_size: int = 16
    kv_cache_gib: float = 2.0  # the cache's bound; its memory is resident only as far as it is used
    # what the KV cache stores (engine/kv_cache.py): auto = 16 bits on CPU (float16, or the model's
    # 16-bit dtype), the model's dtype on GPUs; float32 = the exact reference
    kv_cache_dtype: str = "auto"
    # automatic prefix caching (engine/block_manager.py): full blocks of committed tokens are kept,
    # content-addressed, for later requests; at most `prefix_cache_blocks` unheld ones (None: any
    # free block); `prefix_cache_salt` "per-key" keys them by API key (no sharing across tenants)
    enable_prefix_caching: bool = True
    prefix_cache_blocks: int | None = None
    prefix_cache_salt: str = "per-key"
    # Split the KV cache at this decoder layer into two block pools, so that requests whose tokens a
    # method drops at that layer (or below) hold fewer blocks above it. -1 = the layer a served
    # method asks for (its spec's kv_split_hint), no split otherwise; 0 = no split.
    kv_split_layer: int = -1
    kv_lower_blocks_ratio: float = 2.0  # lower-pool blocks per upper-pool block, in a split cache
    num_threads: int | None = None  # torch intra-op threads; None = all cores
    engine: str = "native"  # "native" (ours) or "vllm" (backends/vllm_engine.py)
    tensor_parallel_size: int = 1  # vLLM only: GPUs one model is split over
    enforce_eager: bool = False  # vLLM only: no CUDA graphs or compilation (faster start, slower steps)
    # the native engine's Triton kernels (paged/tree attention, grouped MoE experts): auto = on CUDA;
    # on = wherever Triton runs (on a CPU only under TRITON_INTERPRET=1: the tests); off = PyTorch's
    triton_kernels: str = "auto"

    @property
    def native_batched_tokens(self) -> int:
        return self.max_num_batched_tokens or 1024

    def context_length(self, max_position_embeddings: int) -> int:
        """The context length served: `max_model_len`, or the model's own capped at 8192."""
        length = self.max_model_len or min(max_position_embeddings, 8192)
        if length > max_position_embeddings:
            raise ValueError(f"max_model_len {length} exceeds the model's {max_position_embeddings}")
        return length

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.quantization not in ("auto", "none", "int8", "int4", "gguf"):
            raise ValueError(f"quantization must be auto, none, int8, int4 or gguf, not {self.quantization!r}")
        if self.activations not in ("auto", "float", "int8"):
            raise ValueError(f"activations must be auto, float or int8, not {self.activations!r}")
        if self.activations == "int8" and (self.quantization == "none" or self.engine != "native"):
            raise ValueError("--activations int8 applies to quantised weights on the native engine (--quantization auto|int8|int4|gguf)")
        if self.quantization not in ("auto", "none") and self.engine != "native":
            raise ValueError("--quantization applies to the native engine (vLLM quantises through its own checkpoints)")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError("max_model_len must be at least 16")
        if self.max_num_seqs < 1 or self.native_batched_tokens < 16 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be positive")
        if self.scheduling_policy not in ("fair", "fifo"):
            raise ValueError(f"scheduling_policy must be fair or fifo, not {self.scheduling_policy!r}")
        if not self.max_step_cost >= 1:
            raise ValueError("max_step_cost must be at least 1")
        if self.prefix_cache_salt not in ("per-key", "shared"):
            raise ValueError(f"prefix_cache_salt must be per-key or shared, not {self.prefix_cache_salt!r}")
        if self.prefix_cache_blocks is not None and self.prefix_cache_blocks < 0:
            raise ValueError("prefix_cache_blocks must be >= 0")
        if self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be positive")
        if self.engine not in ("native", "vllm"):
            raise ValueError(f"engine must be native or vllm, not {self.engine!r}")
        if self.tensor_parallel_size < 1 or (self.tensor_parallel_size > 1 and self.engine != "vllm"):
            raise ValueError("tensor_parallel_size must be >= 1, and above 1 only with the vllm engine")
        if self.triton_kernels not in ("auto", "on", "off"):
            raise ValueError(f"triton_kernels must be auto, on or off, not {self.triton_kernels!r}")
        if self.enforce_eager and self.engine != "vllm":
            raise ValueError("--enforce-eager applies to the vllm engine (the native engine runs eagerly)")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        if self.kv_cache_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError(f"kv_cache_dtype must be auto, float16, bfloat16 or float32, not {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.engine != "native":
            raise ValueError("--kv-cache-dtype applies to the native engine (vLLM keeps its own KV cache)")
        if self.kv_cache_dtype not in ("auto", self.dtype) and self.device != "cpu":
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype}: off the CPU the KV cache is kept in the model's dtype; leave it auto")
        if self.kv_split_layer < -1 or not self.kv_lower_blocks_ratio >= 1:
            raise ValueError("kv_split_layer must be -1 (auto), 0 (none) or a layer; kv_lower_blocks_ratio at least 1")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """API-process settings: admission, limits, authentication."""

    workers: int = 1  # engine worker processes; 0 = the engine on a thread of the API process
    max_queue: int = 256  # choices waiting beyond what the workers run at once; then 429
    request_timeout: float = 600.0  # seconds; a request may ask for less with `timeout`
    drain_timeout: float = 30.0  # seconds to finish in-flight requests after SIGTERM
    max_body_bytes: int = 8 << 20
    max_tokens_per_request: int = 65536  # n x max_tokens of one request
    enable_auto_tool_choice: bool = True  # tool_choice "auto": the model may call a tool (Hermes parser)
    api_keys: tuple[str, ...] = ()  # empty = no authentication
    metrics_require_key: bool = False
    rate_limit_rpm: int | None = None  # per API key (or client address without keys)
    rate_limit_tpm: int | None = None  # prompt + max_tokens, per minute
    # hosts image_url parts may be fetched from (exact names, or *.domain); empty = data: URLs only
    allowed_image_hosts: tuple[str, ...] = ()
    image_fetch_timeout: float = 10.0  # seconds for one image fetch, redirects included
    # fetch from hosts (allowed by name) that resolve to loopback, private or link-local addresses
    allow_private_image_addresses: bool = False
    # request fields this server does not know: a 400 naming them (as OpenAI's API answers), or, for
    # clients that send vendor extras, accepted and named in the x-freelunch-ignored-fields header
    ignore_unknown_fields: bool = False
    # seconds a new grammar (JSON schema, regex, tools) may take to compile before admission; past it
    # the compile is stopped and the request gets a 400 (the refusal is remembered for 10 minutes)
    grammar_compile_timeout: float = 5.0
    body_read_timeout: float = 30.0  # seconds for a request body to arrive whole; then 408
    public_docs: bool = False  # /docs, /redoc and /openapi.json open without an API key
    playground: bool = True  # GET / serves the playground page (api/playground.py)

    def __post_init__(self) -> None:
        if self.workers < 0 or self.max_queue < 0:
            raise ValueError("workers and max_queue must not be negative")
        if self.request_timeout <= 0 or self.drain_timeout < 0 or self.max_body_bytes < 1024:
            raise ValueError("request_timeout must be positive, drain_timeout not negative, max_body_bytes >= 1024")
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("API keys must be non-empty and have no surrounding whitespace")
        for limit in (self.rate_limit_rpm, self.rate_limit_tpm):
            if limit is not None and limit < 1:
                raise ValueError("rate limits must be positive")
        if self.max_tokens_per_request < 1:
            raise ValueError("max_tokens_per_request must be positive")
        if not self.image_fetch_timeout > 0:
            raise ValueError("image_fetch_timeout must be positive")
        for host in self.allowed_image_hosts:
            image_host_pattern(host)


def image_host_pattern(entry: str) -> str:
    """An `--allowed-image-hosts` entry, normalised: a host name or IP address (`[v6]` or bare),
    or `*.example.com` for every subdomain of example.com (not example.com itself). Lower case;
    IDN host names in their ASCII (xn--) form. ValueError for anything else (schemes, ports, paths)."""
    host = entry.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    name = host[2:] if host.startswith("*.") else host
    try:
        ipv6 = bool(ipaddress.IPv6Address(host))
    except ValueError:
        ipv6 = False
    hostname = all(c.isascii() and (c.isalnum() or c in ".-_") for c in name) and "" not in name.split(".")
    if not name or not (ipv6 or hostname):
        raise ValueError(f"an allowed image host is a host name, an IP address or *.domain, not {entry!r}")
    return host


def cache_dir() -> Path:
    """Where converted models and built kernels are kept: FREELUNCH_CACHE_DIR, or ~/.cache/freelunch."""
    return Path(os.environ.get("FREELUNCH_CACHE_DIR", Path.home() / ".cache" / "freelunch"))
