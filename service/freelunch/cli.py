"""`freelunch serve` (load the model, start the pool, serve the OpenAI API) and `freelunch bench`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from freelunch.config import (
    SECURITY,
    EngineConfig,
    ServerConfig,
    add_flags,
    choice_type,
    env_default,
    from_flags,
    unknown_env,
)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, where it has one (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


if TYPE_CHECKING:
    from freelunch.methods.spec import ServerFlag


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
    groups: dict[str, Any] = {}
    add_flags(serve, EngineConfig, os.environ, groups)
    add_flags(serve, ServerConfig, os.environ, groups)
    for flag in _method_flags():  # each installed method's own (methods/spec.py)
        default = env_default(flag.name, flag.default, str, os.environ, flag.choices)
        serve.add_argument(flag.name, default=default, choices=list(flag.choices), type=choice_type(flag.choices), help=flag.help)
    groups[SECURITY].add_argument(
        "--api-key-file", default=env_default("--api-key-file", None, str, os.environ),
        help="a file with API keys, one a line (# comments), besides --api-key",
    )
    from freelunch.benchmark import add_arguments as add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="measure a server on this machine: tokens/s, TTFT, concurrency, each option vs plain"))
    return parser


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` subcommand's parser, out of `build_parser()`'s."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]


def read_api_key_file(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ValueError as e:  # an environment variable that is not its setting's type
        print(f"freelunch: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "bench":
        from freelunch.benchmark import run as run_bench

        return run_bench(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # no network at run time: whatever Hugging Face code runs in this process or its workers stays offline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    unread = unknown_env([a.option_strings[0] for a in serve_parser(parser)._actions if a.option_strings], os.environ)
    if unread:  # on stderr whatever the log level: a setting the operator meant is not in effect
        print(f"freelunch: warning: ignoring {', '.join(unread)}: no setting of freelunch serve reads "
              f"{'it' if len(unread) == 1 else 'them'} (docs/reference.md lists them)", file=sys.stderr)
    from freelunch.models.loader import ModelLoadError
    from freelunch.pool.local_engine import ThreadWorker
    from freelunch.pool.process_worker import start_process_workers

    try:
        config = from_flags(EngineConfig, args)
        server = from_flags(ServerConfig, args)
        server = replace(server, api_keys=tuple(dict.fromkeys(server.api_keys + read_api_key_file(args.api_key_file))))
        if server.native_workers and config.engine != "vllm":
            raise ValueError("--native-workers goes with --engine vllm (the native engine's workers are --workers)")
        defaults = method_defaults(args)
        if config.engine == "vllm" and not server.native_workers:
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
            workers, wait = start_process_workers(config, server.workers, server.log_level)
            waits.append(wait)
        if server.native_workers:
            native = replace(config, engine="native", num_threads=None)
            more, wait = start_process_workers(native, server.native_workers, server.log_level, name_prefix="native-")
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
    log.info("serving %s on http://%s:%d with %d worker(s)", pool.served.name, server.host, server.port, len(workers))
    if not server.api_keys and server.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no --api-key: anyone who can reach %s:%d can use this server", server.host, server.port)

    # The drain is DrainingServer's; uvicorn's own graceful wait only covers what is left after it.
    uv_config = server_config(app, server.host, server.port, log_level=server.log_level, timeout_graceful_shutdown=5)
    # uvicorn re-raises the signal it drained on once it is done: exit 0 then, without a traceback.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        DrainingServer(uv_config, pool, server.drain_timeout).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
