"""`freelunch serve` (load the model, start the pool, serve the OpenAI API) and `freelunch bench`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, where it has one (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


if TYPE_CHECKING:
    from freelunch.methods.spec import ServerFlag


def _env_name(flag: str) -> str:
    return "FREELUNCH_" + flag.lstrip("-").upper().replace("-", "_")


def _method_flags() -> list[ServerFlag]:
    """The installed methods' server flags."""
    from freelunch.methods import method_specs

    return [flag for spec in method_specs().values() for flag in spec.flags]


def method_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Each method's server-wide default options, from its flags ({option: options})."""
    from freelunch.methods import method_specs

    defaults: dict[str, Any] = {}
    for spec in method_specs().values():
        for flag in spec.flags:
            options = flag.options(getattr(args, flag.name.lstrip("-").replace("-", "_")))
            if options is not None:
                defaults[spec.option] = options
    return defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freelunch", description="OpenAI-compatible server with training-free decoding methods")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        description="Serve a model over the OpenAI API. Every flag also reads an environment variable: FREELUNCH_ and "
        "the flag's name in capitals with underscores (--max-num-seqs: FREELUNCH_MAX_NUM_SEQS).",
        formatter_class=_Help,
    )
    env = os.environ.get
    serve.add_argument("--model", default=env("FREELUNCH_MODEL"), help="HF folder (safetensors) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    serve.add_argument(
        "--served-model-name", default=env("FREELUNCH_SERVED_MODEL_NAME"),
        help="the model id clients send and /v1/models lists; default: the model folder's or file's name",
    )
    serve.add_argument(
        "--host", default=env("FREELUNCH_HOST", "127.0.0.1"),
        help="address to listen on (0.0.0.0: every interface; then set --api-key)",
    )
    serve.add_argument("--port", type=int, default=int(env("FREELUNCH_PORT", "8000")), help="TCP port to listen on")
    serve.add_argument(
        "--dtype", default=env("FREELUNCH_DTYPE", "auto"), choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto: the checkpoint's (float32 for a GGUF; on CPU, float16 becomes bfloat16, and a "
        "bfloat16 checkpoint computes in float32 from its weights as stored where our kernels run)",
    )
    serve.add_argument(
        "--quantization",
        default=env("FREELUNCH_QUANTIZATION", "auto"),
        choices=["auto", "none", "int8", "int4", "gguf"],
        help="weight-only quantised linears on CPU (native engine): gguf serves a .gguf file's own blocks "
        "(Q4_0/Q4_1/Q4_K, Q8_0/Q6_K; other types float), int8 per channel, int4 in groups of 32; "
        "auto: gguf for a .gguf model on CPU, none (the checkpoint's dtype) otherwise",
    )
    serve.add_argument(
        "--activations",
        default=env("FREELUNCH_ACTIVATIONS", "auto"),
        choices=["auto", "float", "int8"],
        help="numerics of the quantised layers (docs/reference.md): int8 quantises each input row in blocks of 32 and "
        "multiplies in integer units, as llama.cpp (faster, a row's result still depends on that row alone); float "
        "keeps float32 inputs (equal to transformers on the dequantised weights); auto: int8 where the CPU kernels run",
    )
    serve.add_argument(
        "--max-model-len", type=int, default=int(env("FREELUNCH_MAX_MODEL_LEN", "0")) or None,
        help="context length (prompt + output tokens); default: the model's own",
    )
    serve.add_argument(
        "--engine",
        default=env("FREELUNCH_ENGINE", "native"),
        choices=["native", "vllm"],
        help="decoding engine: ours, or vLLM (needs the vllm extra; options vLLM cannot run go to --native-workers)",
    )
    serve.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=int(env("FREELUNCH_TENSOR_PARALLEL_SIZE", "1")),
        help="with --engine vllm: split one model over this many GPUs (vLLM's tensor parallelism)",
    )
    serve.add_argument(
        "--triton-kernels", default=env("FREELUNCH_TRITON_KERNELS", "auto"), choices=["auto", "on", "off"],
        help="native engine: attention and MoE experts through our Triton kernels (auto: on CUDA)",
    )
    serve.add_argument(
        "--enforce-eager", action="store_true", default=env("FREELUNCH_ENFORCE_EAGER", "") == "1",
        help="with --engine vllm: no CUDA graphs or torch.compile (faster start, slower decoding; vLLM's flag)",
    )
    serve.add_argument(
        "--max-num-seqs", type=int, default=int(env("FREELUNCH_MAX_NUM_SEQS", "64")),
        help="sequences (choices, and a method's extra rows) an engine worker runs at once",
    )
    serve.add_argument(
        "--max-num-batched-tokens", type=int,
        default=int(env("FREELUNCH_MAX_NUM_BATCHED_TOKENS", "0")) or None,
        help="tokens one engine step computes at most (prompt chunks, decode rows, draft trees); "
        "default 1024 on the native engine, vLLM's own with --engine vllm",
    )
    serve.add_argument(
        "--scheduling-policy",
        default=env("FREELUNCH_SCHEDULING_POLICY", "fair"),
        choices=["fair", "fifo"],
        help="fair: running requests share each step's token budget in turns, long prompts are prefilled in "
        "chunks beside decoding requests, API keys are admitted in turns; fifo: admission order",
    )
    serve.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=int(env("FREELUNCH_LONG_PREFILL_TOKEN_THRESHOLD", "256")),
        help="fair policy: prompt tokens a request prefills per step while other requests decode",
    )
    serve.add_argument(
        "--max-step-cost",
        type=float,
        default=float(env("FREELUNCH_MAX_STEP_COST", "2")),
        help="a request's rows may make an engine step cost at most this many one-token decode steps, as measured "
        "at start on this hardware: an option whose rows cost more (a draft tree) is a 400 naming the largest "
        "tree this server takes",
    )
    serve.add_argument(
        "--max-tokens-per-request",
        type=int,
        default=int(env("FREELUNCH_MAX_TOKENS_PER_REQUEST", "65536")),
        help="n x max_tokens a request may ask for (400 beyond)",
    )
    serve.add_argument(
        "--kv-cache-gib", type=float, default=float(env("FREELUNCH_KV_CACHE_GIB", "2")),
        help="GiB of KV cache per engine worker, at most (native engine: resident only as far as it is used; vLLM: "
        "its own KV cache space)",
    )
    serve.add_argument(
        "--kv-cache-dtype", default=env("FREELUNCH_KV_CACHE_DTYPE", "auto"), choices=["auto", "float16", "bfloat16", "float32"],
        help="what the KV cache stores (native engine): auto = 16 bits on CPU (float16, or the model's 16-bit dtype; "
        "half the memory of float32, attention still computes in float32), the model's dtype on GPUs; float32 = "
        "the exact reference",
    )
    serve.add_argument(
        "--no-prefix-caching",
        action="store_true",
        default=env("FREELUNCH_NO_PREFIX_CACHING", "") not in ("", "0", "false"),
        help="recompute every prompt from its first token (automatic prefix caching is on by default)",
    )
    serve.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=int(env("FREELUNCH_PREFIX_CACHE_BLOCKS", "-1")),
        help="keep at most this many KV blocks no request holds for the prefix cache (-1: every free block)",
    )
    serve.add_argument(
        "--prefix-cache-salt",
        default=env("FREELUNCH_PREFIX_CACHE_SALT", "per-key"),
        choices=["per-key", "shared"],
        help="per-key: cached prefixes are shared only among requests of one API key (no timing side channel "
        "between tenants); shared: among all requests",
    )
    serve.add_argument(
        "--kv-split-layer",
        type=int,
        default=int(env("FREELUNCH_KV_SPLIT_LAYER", "-1")),
        help="split the KV cache into two block pools at this decoder layer, so that requests whose tokens a "
        "method drops at or below it hold blocks above it for their kept tokens only (-1: the layer a served "
        "method asks for, layer 2 for vision models with the shipped methods, none otherwise; 0: no split)",
    )
    serve.add_argument(
        "--kv-lower-blocks-ratio",
        type=float,
        default=float(env("FREELUNCH_KV_LOWER_BLOCKS_RATIO", "2")),
        help="in a split cache, blocks below the split per block above it (requests keeping half their "
        "tokens fill both pools at 2)",
    )
    serve.add_argument("--threads", type=int, default=int(env("FREELUNCH_THREADS", "0")) or None, help="CPU threads of each engine worker; default: torch's (every core), 1 with --workers 0")
    for flag in _method_flags():  # each installed method's own (methods/spec.py)
        serve.add_argument(flag.name, default=env(_env_name(flag.name), flag.default), choices=list(flag.choices), help=flag.help)
    serve.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=env("FREELUNCH_ENABLE_AUTO_TOOL_CHOICE", "1") == "1",
        help='tool_choice "auto" (the default when a request has tools): the model may answer or call a tool, '
        "found by the tool-call parser (on by default; --no-enable-auto-tool-choice makes auto a 400)",
    )
    serve.add_argument(
        "--tool-call-parser",
        default=env("FREELUNCH_TOOL_CALL_PARSER", "hermes"),
        choices=["hermes"],
        help="how tool calls are written and found: hermes, <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>",
    )
    serve.add_argument(
        "--log-level", default=env("FREELUNCH_LOG_LEVEL", "info"), type=str.lower, choices=["debug", "info", "warning", "error"],
        help="log level of the server and its workers",
    )
    pool = serve.add_argument_group("worker pool and admission")
    pool.add_argument(
        "--workers",
        type=int,
        default=int(env("FREELUNCH_WORKERS", "1")),
        help="engine worker processes, each with its own model copy (0: the engine on a thread of the API process)",
    )
    pool.add_argument(
        "--native-workers",
        type=int,
        default=int(env("FREELUNCH_NATIVE_WORKERS", "0")),
        help="with --engine vllm: native engine processes beside vLLM for the options vLLM cannot run",
    )
    pool.add_argument("--max-queue", type=int, default=int(env("FREELUNCH_MAX_QUEUE", "256")), help="requests queued beyond what the workers run; then 429")
    pool.add_argument("--request-timeout", type=float, default=float(env("FREELUNCH_REQUEST_TIMEOUT", "600")), help="seconds; a request may ask for less")
    pool.add_argument("--drain-timeout", type=float, default=float(env("FREELUNCH_DRAIN_TIMEOUT", "30")), help="seconds to finish in-flight requests after SIGTERM")
    sec = serve.add_argument_group("security and limits")
    sec.add_argument("--api-key", action="append", default=None, help="required as `Authorization: Bearer KEY` on /v1/* (repeatable; env FREELUNCH_API_KEY, comma-separated)")
    sec.add_argument("--api-key-file", default=env("FREELUNCH_API_KEY_FILE"), help="a file with one API key per line")
    sec.add_argument("--metrics-require-key", action="store_true", default=env("FREELUNCH_METRICS_REQUIRE_KEY", "") == "1", help="protect /metrics with the API keys too")
    sec.add_argument(
        "--max-body-bytes", type=int, default=int(env("FREELUNCH_MAX_BODY_BYTES", str(8 << 20))),
        help="largest request body accepted (413 beyond), images inline included",
    )
    sec.add_argument("--rate-limit-rpm", type=int, default=int(env("FREELUNCH_RATE_LIMIT_RPM", "0")) or None, help="requests per minute per API key")
    sec.add_argument("--rate-limit-tpm", type=int, default=int(env("FREELUNCH_RATE_LIMIT_TPM", "0")) or None, help="tokens (prompt + max_tokens) per minute per API key")
    sec.add_argument(
        "--allowed-image-hosts",
        action="append",
        default=None,
        help="hosts whose http(s) image URLs may be fetched: exact names or *.domain (repeatable or comma-separated; "
        "env FREELUNCH_ALLOWED_IMAGE_HOSTS, comma-separated); default: none, data: URLs only",
    )
    sec.add_argument(
        "--allow-private-image-addresses",
        action="store_true",
        default=env("FREELUNCH_ALLOW_PRIVATE_IMAGE_ADDRESSES", "") == "1",
        help="fetch images from allowed host names that resolve to loopback, private or link-local addresses "
        "(refused by default: an IP literal in --allowed-image-hosts is always allowed)",
    )
    sec.add_argument(
        "--ignore-unknown-fields",
        action="store_true",
        default=env("FREELUNCH_IGNORE_UNKNOWN_FIELDS", "") == "1",
        help="accept request fields this server does not know (vendor extras some clients send) and name them in "
        "the x-freelunch-ignored-fields response header; by default they are a 400 naming the field",
    )
    sec.add_argument(
        "--body-read-timeout",
        type=float,
        default=float(env("FREELUNCH_BODY_READ_TIMEOUT", "30")),
        help="seconds for a request body to arrive whole (408 beyond): a client trickling its body holds a "
        "connection no longer",
    )
    sec.add_argument(
        "--public-docs",
        action="store_true",
        default=env("FREELUNCH_PUBLIC_DOCS", "") == "1",
        help="serve /docs, /redoc and /openapi.json without an API key (by default they follow --api-key, like "
        "the API they describe)",
    )
    sec.add_argument(
        "--no-playground",
        action="store_true",
        default=env("FREELUNCH_NO_PLAYGROUND", "") == "1",
        help="do not serve the playground page at / (a page for trying the methods in a browser)",
    )
    sec.add_argument(
        "--grammar-compile-timeout",
        type=float,
        default=float(env("FREELUNCH_GRAMMAR_COMPILE_TIMEOUT", "5")),
        help="CPU seconds a new grammar (JSON schema, regex, tools) may take to compile, in a separate process, before "
        "admission; past it the compile is stopped, the request gets a 400 and the refusal is remembered",
    )
    sec.add_argument("--image-fetch-timeout", type=float, default=float(env("FREELUNCH_IMAGE_FETCH_TIMEOUT", "10")), help="seconds for one image fetch")
    from freelunch.benchmark import add_arguments as add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="measure a server on this machine: tokens/s, TTFT, concurrency, each option vs plain"))
    return parser


def read_api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("FREELUNCH_API_KEY", "").split(",") if k.strip()]
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def read_image_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    hosts = [h.strip() for value in args.allowed_image_hosts or [] for h in value.split(",")]
    hosts += [h.strip() for h in os.environ.get("FREELUNCH_ALLOWED_IMAGE_HOSTS", "").split(",")]
    return tuple(dict.fromkeys(h for h in hosts if h))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from freelunch.benchmark import run as run_bench

        return run_bench(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # no network at run time: whatever Hugging Face code runs in this process or its workers stays offline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from freelunch.config import EngineConfig, ServerConfig
    from freelunch.models.loader import ModelLoadError
    from freelunch.pool.process_worker import start_process_workers
    from freelunch.pool.worker import ThreadWorker

    try:
        config = EngineConfig(
            model=args.model,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            quantization=args.quantization,
            activations=args.activations,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            scheduling_policy=args.scheduling_policy,
            max_step_cost=args.max_step_cost,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            kv_cache_gib=args.kv_cache_gib,
            kv_cache_dtype=args.kv_cache_dtype,
            enable_prefix_caching=not args.no_prefix_caching,
            prefix_cache_blocks=None if args.prefix_cache_blocks < 0 else args.prefix_cache_blocks,
            prefix_cache_salt=args.prefix_cache_salt,
            kv_split_layer=args.kv_split_layer,
            kv_lower_blocks_ratio=args.kv_lower_blocks_ratio,
            num_threads=args.threads,
            engine=args.engine,
            tensor_parallel_size=args.tensor_parallel_size,
            enforce_eager=args.enforce_eager,
            triton_kernels=args.triton_kernels,
        )
        server = ServerConfig(
            workers=args.workers,
            max_queue=args.max_queue,
            request_timeout=args.request_timeout,
            drain_timeout=args.drain_timeout,
            max_body_bytes=args.max_body_bytes,
            api_keys=read_api_keys(args),
            metrics_require_key=args.metrics_require_key,
            rate_limit_rpm=args.rate_limit_rpm,
            rate_limit_tpm=args.rate_limit_tpm,
            allowed_image_hosts=read_image_hosts(args),
            image_fetch_timeout=args.image_fetch_timeout,
            max_tokens_per_request=args.max_tokens_per_request,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            allow_private_image_addresses=args.allow_private_image_addresses,
            ignore_unknown_fields=args.ignore_unknown_fields,
            grammar_compile_timeout=args.grammar_compile_timeout,
            body_read_timeout=args.body_read_timeout,
            public_docs=args.public_docs,
            playground=not args.no_playground,
        )
        if args.native_workers and config.engine != "vllm":
            raise ValueError("--native-workers goes with --engine vllm (the native engine's workers are --workers)")
        defaults = method_defaults(args)
        if config.engine == "vllm" and not args.native_workers:
            from freelunch.methods import method_specs

            specs = method_specs()
            native_only = [flag.name for option in defaults if "vllm" not in specs[option].engines for flag in specs[option].flags]
            if native_only:
                raise ValueError(f"{native_only[0]} runs on native workers: with --engine vllm, add --native-workers N")
        waits = []
        if server.workers == 0:
            # native: one torch thread unless told; libgomp throttles the spinning of OpenMP teams
            # started from a thread other than the process's first (EngineLoop.run_here): 2.4x slower at 2
            threads = config.num_threads or (1 if config.engine == "native" else None)
            workers = [ThreadWorker.load(replace(config, num_threads=threads))]
        else:
            workers, wait = start_process_workers(config, server.workers, args.log_level)
            waits.append(wait)
        if args.native_workers:
            native = replace(config, engine="native", num_threads=None)
            more, wait = start_process_workers(native, args.native_workers, args.log_level, name_prefix="native-")
            workers, waits = workers + more, waits + [wait]
        # the API side's imports and tokenizer load while the workers load their models
        from freelunch.api.app import create_app
        from freelunch.api.http_server import DrainingServer, server_config
        from freelunch.pool.pool import WorkerPool

        for wait in waits:
            wait(900.0)
        from freelunch.memory import release_freed_memory

        release_freed_memory()  # what loading the tokenizer and the imports freed
    except (ValueError, OSError, ModelLoadError, RuntimeError, TimeoutError) as e:
        print(f"freelunch: {e}", file=sys.stderr)
        return 2
    capacity = max(1, len(workers)) * config.max_num_seqs + server.max_queue
    pool = WorkerPool(workers, max_in_flight=capacity)
    app = create_app(pool, defaults, server)
    log = logging.getLogger("freelunch")
    log.info("serving %s on http://%s:%d with %d worker(s)", pool.served.name, args.host, args.port, len(workers))
    if not server.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no --api-key: anyone who can reach %s:%d can use this server", args.host, args.port)

    # The drain is DrainingServer's; uvicorn's own graceful wait only covers what is left after it.
    uv_config = server_config(app, args.host, args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    # uvicorn re-raises the signal it drained on once it is done: exit 0 then, without a traceback.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        DrainingServer(uv_config, pool, server.drain_timeout).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
