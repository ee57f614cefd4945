"""`freelunch serve`: load the model, start the pool, serve the OpenAI API."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freelunch", description="OpenAI-compatible server with training-free decoding methods")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API")
    env = os.environ.get
    serve.add_argument("--model", default=env("FREELUNCH_MODEL"), help="HF folder (safetensors) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    serve.add_argument("--served-model-name", default=env("FREELUNCH_SERVED_MODEL_NAME"))
    serve.add_argument("--host", default=env("FREELUNCH_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env("FREELUNCH_PORT", "8000")))
    serve.add_argument("--dtype", default=env("FREELUNCH_DTYPE", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-model-len", type=int, default=int(env("FREELUNCH_MAX_MODEL_LEN", "0")) or None)
    serve.add_argument("--engine", default=env("FREELUNCH_ENGINE", "native"), choices=["native"])
    serve.add_argument("--max-num-seqs", type=int, default=int(env("FREELUNCH_MAX_NUM_SEQS", "64")))
    serve.add_argument("--max-num-batched-tokens", type=int, default=int(env("FREELUNCH_MAX_NUM_BATCHED_TOKENS", "1024")))
    serve.add_argument("--kv-cache-gib", type=float, default=float(env("FREELUNCH_KV_CACHE_GIB", "2")))
    serve.add_argument("--threads", type=int, default=int(env("FREELUNCH_THREADS", "0")) or None, help="torch CPU threads")
    serve.add_argument(
        "--speculative",
        default=env("FREELUNCH_SPECULATIVE", "none"),
        choices=["none", "token_recycling"],
        help="speculative decoding for every eligible request (a request may opt out with speculative.method=none)",
    )
    serve.add_argument("--log-level", default=env("FREELUNCH_LOG_LEVEL", "info"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from freelunch.api.app import create_app
    from freelunch.config import EngineConfig
    from freelunch.models.loader import ModelLoadError
    from freelunch.pool.pool import WorkerPool
    from freelunch.pool.worker import EngineWorker

    try:
        config = EngineConfig(
            model=args.model,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_gib=args.kv_cache_gib,
            num_threads=args.threads,
        )
        worker = EngineWorker.load(config)
    except (ValueError, ModelLoadError) as e:
        print(f"freelunch: {e}", file=sys.stderr)
        return 2
    defaults = {"speculative": {"method": args.speculative}} if args.speculative != "none" else {}
    app = create_app(WorkerPool([worker]), defaults)
    logging.getLogger("freelunch").info("serving %s on http://%s:%d", worker.engine.info.name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
