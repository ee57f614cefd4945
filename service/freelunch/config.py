"""Engine settings, validated once at start and frozen."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

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


def env_name(flag: str) -> str:
    """The environment variable of a `freelunch serve` flag: --max-num-seqs -> FREELUNCH_MAX_NUM_SEQS."""
    return "FREELUNCH_" + flag.lstrip("-").upper().replace("-", "_")


# FREELUNCH_* variables read outside the flags: the cache folder and the kernel switches above
OTHER_ENV = ("FREELUNCH_CACHE_DIR", *(name for name in KERNEL_SWITCHES if name.startswith("FREELUNCH_")))


def unknown_env(flags: list[str], environ: Mapping[str, str]) -> list[str]:
    """FREELUNCH_* variables in `environ` that no flag of `flags` and no other setting reads (a
    typo, or a name from an older release): the server says so rather than ignore them silently."""
    known = {env_name(flag) for flag in flags} | set(OTHER_ENV)
    return sorted(name for name in environ if name.startswith("FREELUNCH_") and name not in known)


def env_default(flag: str, default: Any, kind: type, environ: Mapping[str, str], choices: tuple[str, ...] = ()) -> Any:
    """A flag's default: its environment variable parsed as the setting's type, else `default` (an
    empty variable is an unset one). ValueError naming the variable for a value that is not of that
    type or not among the choices."""
    name = env_name(flag)
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    if choices:  # argparse checks a flag's value, not its default
        value = _choice(raw, choices)
        if value is None:
            raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
        return value
    try:
        if kind is bool:
            return _BOOLS[raw.lower()]
        if kind is tuple:
            return tuple(v.strip() for v in raw.split(",") if v.strip())
        return kind(raw)
    except (KeyError, ValueError):
        raise ValueError(f"{name}={raw!r} is not {_KIND_NAMES.get(kind, kind.__name__)}") from None


def _choice(value: str, choices: tuple[str, ...]) -> str | None:
    """`value` as one of `choices`, case aside where the choices are all lower case (INFO = info)."""
    if value in choices:
        return value
    return value.lower() if value.lower() in choices and all(c == c.lower() for c in choices) else None


def choice_type(choices: tuple[str, ...]) -> Any:
    """argparse's `type` for a flag with choices: the value as its choice, case aside (`_choice`)."""
    return lambda value: _choice(value, choices) or value  # argparse names the value that is no choice


_KIND_NAMES = {bool: "a boolean (1 or 0)", int: "an integer", float: "a number"}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
# FREELUNCH_* names of earlier releases whose setting is now read under another name: refused at
# start, naming the new one, since ignoring them would silently change what the server does
RENAMED_ENV = {"FREELUNCH_NO_PREFIX_CACHING": "FREELUNCH_PREFIX_CACHING=0 (or --no-prefix-caching)"}


def _flag(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _kind(annotation: str) -> type:
    """The parsed type of a setting from its annotation ("int | None" -> int, "tuple[str, ...]" -> tuple)."""
    base = annotation.split("|")[0].strip()
    return tuple if base.startswith("tuple") else {"str": str, "int": int, "float": float, "bool": bool}[base]


def add_flags(parser: argparse.ArgumentParser, config: type, environ: Mapping[str, str], groups: dict[str, Any]) -> None:
    """`config`'s settings as flags of `parser` (in their groups, made once into `groups`), each
    defaulting to its environment variable, else to the declared default."""
    for name, new in RENAMED_ENV.items():
        if name in environ:
            raise ValueError(f"{name} is no longer read: set {new}")
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        flag, kind, choices = _flag(f), _kind(str(f.type)), f.metadata["choices"]
        group = f.metadata["group"]
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        target = groups[group] if group else parser
        default = env_default(flag, f.default, kind, environ, choices)  # an `unset` value: from_flags
        options: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": default}
        if choices:
            options["choices"] = list(choices)
            options["type"] = choice_type(choices)
        elif kind is not bool:
            options["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction  # --x and --no-x: a flag undoes what the environment set
        elif kind is tuple:
            # repeatable; the environment's values join the flags' (from_flags), as a list of keys does
            options["action"] = "append"
            options["default"] = None
            options["help"] += f" (also {env_name(flag)}, comma-separated; both apply)"
            parser.set_defaults(**{f"{f.name}__env": default})
        else:
            options.setdefault("type", kind)
        target.add_argument(flag, **options)


def check_choices(config: Any) -> None:
    """ValueError for a setting outside its declared choices."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {value!r}")


def from_flags(config: type, args: argparse.Namespace) -> Any:
    """`config` from parsed flags (add_flags), checked by its __post_init__. A list setting's given
    values may be comma-separated; an empty one is an error (an unset `--api-key "$KEY"` must not
    leave a server open)."""
    values: dict[str, Any] = {}
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        value = getattr(args, f.name)
        if _kind(str(f.type)) is tuple:
            given = [v.strip() for item in value or [] for v in item.split(",")]
            if "" in given:
                raise ValueError(f"{_flag(f)} was given an empty value")
            value = tuple(dict.fromkeys([*given, *getattr(args, f"{f.name}__env")]))
        elif f.metadata["unset"] is not None and value == f.metadata["unset"]:
            value = f.default
        values[f.name] = value
    return config(**values)


def setting(
    default: Any, help: str, *, flag: str = "", choices: tuple[str, ...] = (), group: str = "", unset: Any = None
) -> Any:
    """A setting's declaration: a dataclass field whose `freelunch serve` flag (`--` + its name in
    kebab case, unless `flag` names it), environment variable (FREELUNCH_ + the flag's name) and
    help come from here: `add_flags` builds the parser from these fields and `from_flags` the config.
    `unset`: a value that also means the default, as a flag or variable (0 for "no limit")."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "group": group, "unset": unset})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What an engine worker is started with (one per worker process, checked in __post_init__)."""

    model: str | None = setting(None, "HF folder (safetensors) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    served_model_name: str | None = setting(
        None, "the model id clients send and /v1/models lists; default: the model folder's or file's name"
    )
    dtype: str = setting(
        "auto",
        "compute dtype; auto: the checkpoint's (float32 for a GGUF; on CPU, float16 becomes bfloat16, and a bfloat16 "
        "checkpoint computes in float32 from its weights as stored where our kernels run)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    quantization: str = setting(
        "auto",
        "weight-only quantised linears on CPU (native engine; models/quantization.py): gguf serves a .gguf file's own "
        "blocks (Q4_0/Q4_1/Q4_K, Q8_0/Q6_K; other types float), int8 per channel, int4 in groups of 32; auto: gguf "
        "for a .gguf model on CPU, none (the checkpoint's dtype) otherwise",
        choices=("auto", "none", "int8", "int4", "gguf"),
    )
    activations: str = setting(
        "auto",
        "numerics of the quantised layers (docs/reference.md): int8 quantises each input row in blocks of 32 and "
        "multiplies in integer units, as llama.cpp (faster, a row's result still depends on that row alone); float "
        "keeps float32 inputs (equal to transformers on the dequantised weights); auto: int8 where the CPU kernels run",
        choices=("auto", "float", "int8"),
    )
    device: str = setting("cpu", "where the native engine runs: cpu, or cuda (cuda:N) (vLLM picks its own device)")
    max_model_len: int | None = setting(
        None, "context length (prompt + output tokens); default (or 0): the model's own, capped at 8192", unset=0
    )
    max_num_seqs: int = setting(64, "sequences (choices, and a method's extra rows) an engine worker runs at once")
    max_num_batched_tokens: int | None = setting(
        None,
        "tokens one engine step computes at most (prompt chunks, decode rows, draft trees); default 1024 on the "
        "native engine, vLLM's own (larger on GPUs) with --engine vllm (or 0: the same)",
        unset=0,
    )
    scheduling_policy: str = setting(
        "fair",
        "fair: running requests share each step's token budget in turns, long prompts are prefilled in chunks beside "
        "decoding requests, API keys are admitted in turns; fifo: admission order (engine/scheduler.py)",
        choices=("fair", "fifo"),
    )
    max_step_cost: float = setting(
        2.0,
        "a request's rows may make an engine step cost at most this many one-token decode steps, as measured at start "
        "on this hardware: an option whose rows cost more (a draft tree) is a 400 naming the largest tree this server takes",
    )
    long_prefill_token_threshold: int = setting(256, "fair policy: prompt tokens a request prefills per step while other requests decode")
    block_size: int = setting(16, "tokens per KV-cache block (the prefix cache shares whole blocks)")
    kv_cache_gib: float = setting(
        2.0,
        "GiB of KV cache per engine worker, at most (native engine: resident only as far as it is used; vLLM on CPUs: "
        "its KV cache size; vLLM on GPUs sizes its own from free memory)",
    )
    kv_cache_dtype: str = setting(
        "auto",
        "what the KV cache stores (native engine; engine/kv_cache.py): auto = 16 bits on CPU (float16, or the model's "
        "16-bit dtype; half the memory of float32, attention still computes in float32), the model's dtype on GPUs; "
        "float32 = the exact reference",
        choices=("auto", "float16", "bfloat16", "float32"),
    )
    # automatic prefix caching (engine/block_manager.py): full blocks of committed tokens are kept,
    # content-addressed, for later requests
    enable_prefix_caching: bool = setting(
        True, "keep full blocks of finished prompts for later requests (--no-prefix-caching: recompute every prompt)",
        flag="--prefix-caching",
    )
    prefix_cache_blocks: int | None = setting(
        None, "keep at most this many KV blocks no request holds for the prefix cache; default (or -1): every free block",
        unset=-1,
    )
    prefix_cache_salt: str = setting(
        "per-key",
        "per-key: cached prefixes are shared only among requests of one API key (no timing side channel between "
        "tenants); shared: among all requests",
        choices=("per-key", "shared"),
    )
    kv_split_layer: int = setting(
        -1,
        "split the KV cache into two block pools at this decoder layer, so that requests whose tokens a method drops "
        "at or below it hold blocks above it for their kept tokens only (-1: the layer a served method asks for, "
        "through its spec's kv_split_hint, none otherwise; 0: no split)",
    )
    kv_lower_blocks_ratio: float = setting(
        2.0, "in a split cache, blocks below the split per block above it (requests keeping half their tokens fill both pools at 2)"
    )
    num_threads: int | None = setting(
        None, "CPU threads of each engine worker; default (or 0): cores / workers, at least 1 (1 with --workers 0)",
        flag="--threads", unset=0,
    )
    engine: str = setting(
        "native",
        "decoding engine: ours, or vLLM (backends/vllm_engine.py; needs the vllm extra; options vLLM cannot run go to "
        "--native-workers)",
        choices=("native", "vllm"),
    )
    tensor_parallel_size: int = setting(1, "with --engine vllm: split one model over this many GPUs (vLLM's tensor parallelism)")
    enforce_eager: bool = setting(
        False, "with --engine vllm: no CUDA graphs or torch.compile (faster start, slower decoding; vLLM's flag)"
    )
    triton_kernels: str = setting(
        "auto",
        "native engine: attention and MoE experts through our Triton kernels; auto = on CUDA; on = wherever Triton "
        "runs (on a CPU only under TRITON_INTERPRET=1: the tests); off = PyTorch's",
        choices=("auto", "on", "off"),
    )

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
        check_choices(self)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda (cuda:N), not {self.device!r}")
        if self.activations == "int8" and (self.quantization == "none" or self.engine != "native"):
            raise ValueError("--activations int8 applies to quantised weights on the native engine (--quantization auto|int8|int4|gguf)")
        if self.quantization not in ("auto", "none") and self.engine != "native":
            raise ValueError("--quantization applies to the native engine (vLLM quantises through its own checkpoints)")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError("max_model_len must be at least 16")
        if self.max_num_seqs < 1 or self.native_batched_tokens < 16 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be positive")
        if not self.max_step_cost >= 1:
            raise ValueError("max_step_cost must be at least 1")
        if self.prefix_cache_blocks is not None and self.prefix_cache_blocks < 0:
            raise ValueError("prefix_cache_blocks must be >= 0")
        if self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be positive")
        if self.tensor_parallel_size < 1 or (self.tensor_parallel_size > 1 and self.engine != "vllm"):
            raise ValueError("tensor_parallel_size must be >= 1, and above 1 only with the vllm engine")
        if self.engine != "native" and (self.device != "cpu" or self.block_size != 16):
            raise ValueError("--device and --block-size apply to the native engine (vLLM picks its own)")
        if self.enforce_eager and self.engine != "vllm":
            raise ValueError("--enforce-eager applies to the vllm engine (the native engine runs eagerly)")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        if self.kv_cache_dtype != "auto" and self.engine != "native":
            raise ValueError("--kv-cache-dtype applies to the native engine (vLLM keeps its own KV cache)")
        if self.kv_cache_dtype not in ("auto", self.dtype) and self.device != "cpu":
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype}: off the CPU the KV cache is kept in the model's dtype; leave it auto")
        if self.kv_split_layer < -1 or not self.kv_lower_blocks_ratio >= 1:
            raise ValueError("kv_split_layer must be -1 (auto), 0 (none) or a layer; kv_lower_blocks_ratio at least 1")


POOL = "worker pool and admission"
SECURITY = "security and limits"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """API-process settings: listening, admission, limits, authentication."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface; then set --api-key)")
    port: int = setting(8000, "TCP port to listen on")
    log_level: str = setting("info", "log level of the server and its workers", choices=("debug", "info", "warning", "error"))
    enable_auto_tool_choice: bool = setting(
        True,
        'tool_choice "auto" (the default when a request has tools): the model may answer or call a tool, found by '
        "the tool-call parser (--no-enable-auto-tool-choice makes auto a 400)",
    )
    tool_call_parser: str = setting(
        "hermes", 'how tool calls are written and found: hermes, <tool_call>{"name": ..., "arguments": ...}</tool_call>',
        choices=("hermes",),
    )
    playground: bool = setting(True, "serve the playground page at / (try the methods in a browser)")
    workers: int = setting(
        1, "engine worker processes, each with its own model copy (0: the engine on a thread of the API process)", group=POOL
    )
    native_workers: int = setting(
        0, "with --engine vllm: native engine processes beside vLLM for the options vLLM cannot run", group=POOL
    )
    max_queue: int = setting(256, "choices waiting beyond what the workers run at once; then 429", group=POOL)
    request_timeout: float = setting(600.0, "seconds; a request may ask for less with `timeout`", group=POOL)
    drain_timeout: float = setting(30.0, "seconds to finish in-flight requests after SIGTERM", group=POOL)
    api_keys: tuple[str, ...] = setting(
        (), "required as `Authorization: Bearer KEY` on /v1/* (repeatable, or comma-separated); default: no authentication",
        flag="--api-key", group=SECURITY,
    )
    metrics_require_key: bool = setting(False, "protect /metrics with the API keys too", group=SECURITY)
    max_body_bytes: int = setting(8 << 20, "largest request body accepted (413 beyond), images inline included", group=SECURITY)
    max_tokens_per_request: int = setting(65536, "n x max_tokens a request may ask for (400 beyond)", group=SECURITY)
    rate_limit_rpm: int | None = setting(
        None, "requests per minute per API key (or client address without keys); default (or 0): no limit", group=SECURITY, unset=0
    )
    rate_limit_tpm: int | None = setting(
        None, "tokens (prompt + max_tokens) per minute per API key; default (or 0): no limit", group=SECURITY, unset=0
    )
    allowed_image_hosts: tuple[str, ...] = setting(
        (),
        "hosts whose http(s) image URLs may be fetched: exact names or *.domain (repeatable or comma-separated); "
        "default: none, data: URLs only",
        group=SECURITY,
    )
    image_fetch_timeout: float = setting(10.0, "seconds for one image fetch, redirects included", group=SECURITY)
    allow_private_image_addresses: bool = setting(
        False,
        "fetch images from allowed host names that resolve to loopback, private or link-local addresses (refused by "
        "default: an IP literal in --allowed-image-hosts is always allowed)",
        group=SECURITY,
    )
    ignore_unknown_fields: bool = setting(
        False,
        "accept request fields this server does not know (vendor extras some clients send) and name them in the "
        "x-freelunch-ignored-fields response header; by default they are a 400 naming the field",
        group=SECURITY,
    )
    grammar_compile_timeout: float = setting(
        5.0,
        "CPU seconds a new grammar (JSON schema, regex, tools) may take to compile, in a separate process, before "
        "admission; past it the compile is stopped, the request gets a 400 and the refusal is remembered for 10 minutes",
        group=SECURITY,
    )
    body_read_timeout: float = setting(
        30.0, "seconds for a request body to arrive whole (408 beyond): a client trickling its body holds a connection no longer",
        group=SECURITY,
    )
    public_docs: bool = setting(
        False,
        "serve /docs, /redoc and /openapi.json without an API key (by default they follow --api-key, like the API "
        "they describe)",
        group=SECURITY,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.workers < 0 or self.max_queue < 0 or self.native_workers < 0:
            raise ValueError("workers, native_workers and max_queue must not be negative")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, not {self.port}")
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
