"""`freelunch serve --help` describes every flag, with its default where it has one."""

from __future__ import annotations

import argparse

import pytest
from freelunch.cli import build_parser, serve_parser


def _serve() -> argparse.ArgumentParser:
    return serve_parser(build_parser())


def test_every_serve_flag_has_help_and_shows_its_default(monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("FREELUNCH_")]:
        monkeypatch.delenv(name)
    serve = _serve()
    text = serve.format_help()
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 30
    for action in flags:
        assert action.help and len(action.help) > 10, f"{action.option_strings[0]} has no help"
    for flag, default in (("--port", "8000"), ("--host", "127.0.0.1"), ("--max-num-seqs", "64"), ("--kv-cache-gib", "2.0"),
                          ("--native-workers", "0"), ("--log-level", "info")):
        block = text.split("options:", 1)[1].split(f"\n  {flag}", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(block.split()), flag
    assert "default: None" not in text


def test_flags_come_from_the_config_declaration(monkeypatch):
    """One declaration (config.py): parsing no flags gives the configs' own defaults, each flag
    and its environment variable land in its setting, and docs/reference.md lists every flag."""
    from pathlib import Path

    from freelunch.config import EngineConfig, ServerConfig, from_flags

    for name in [k for k in __import__("os").environ if k.startswith("FREELUNCH_")]:
        monkeypatch.delenv(name)
    args = build_parser().parse_args(["serve"])
    assert from_flags(EngineConfig, args) == EngineConfig()
    assert from_flags(ServerConfig, args) == ServerConfig()
    monkeypatch.setenv("FREELUNCH_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("FREELUNCH_PLAYGROUND", "0")
    args = build_parser().parse_args(["serve", "--kv-cache-gib", "0.5", "--no-prefix-caching", "--threads", "3", "--playground"])
    engine, server = from_flags(EngineConfig, args), from_flags(ServerConfig, args)
    assert (engine.max_num_seqs, engine.kv_cache_gib, engine.enable_prefix_caching, engine.num_threads) == (7, 0.5, False, 3)
    assert server.playground is True  # the flag undoes the environment
    reference = (Path(__file__).parents[1] / "docs" / "reference.md").read_text()
    missing = [a.option_strings[0] for a in _serve()._actions
               if a.option_strings and a.dest != "help" and f"`{a.option_strings[0]}" not in reference]
    assert missing == [], f"docs/reference.md does not list {missing}"


def test_an_unknown_freelunch_variable_is_named_not_ignored():
    from freelunch.config import unknown_env

    flags = [a.option_strings[0] for a in _serve()._actions if a.option_strings]
    environ = {"FREELUNCH_NO_PREFIX_CACHINGS": "1", "FREELUNCH_PREFIX_CACHING": "0", "FREELUNCH_CACHE_DIR": "/c",
               "FREELUNCH_CPU_LINEAR": "torch", "FREELUNCH_SPECULATIVE": "token_recycling", "FREELUNCH_MAX_NUMSEQS": "4"}
    assert unknown_env(flags, environ) == ["FREELUNCH_MAX_NUMSEQS", "FREELUNCH_NO_PREFIX_CACHINGS"]


def test_a_variable_outside_its_choices_is_refused_naming_it(monkeypatch):
    from freelunch.cli import main

    monkeypatch.setenv("FREELUNCH_LOG_LEVEL", "WARNING")  # case aside, a choice
    args = build_parser().parse_args(["serve", "--dtype", "Float32", "--speculative", "Token_Recycling"])
    assert (args.log_level, args.dtype, args.speculative) == ("warning", "float32", "token_recycling")
    for name, value in (("FREELUNCH_DTYPE", "fp8"), ("FREELUNCH_SPECULATIVE", "medusa")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"{name}='{value}' is not one of"):
            build_parser()
        assert main(["serve"]) == 2
        monkeypatch.delenv(name)


def test_api_keys_from_flags_environment_and_file_and_never_an_empty_one(monkeypatch, tmp_path):
    from freelunch.cli import main
    from freelunch.config import ServerConfig, from_flags

    monkeypatch.setenv("FREELUNCH_API_KEY", "env-key, ,")
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nfile-key\n")
    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b,c", "--api-key-file", str(keys)])
    assert from_flags(ServerConfig, args).api_keys == ("a", "b", "c", "env-key")
    # `--api-key "$KEY"` with KEY unset must not start a server without authentication
    with pytest.raises(ValueError, match="--api-key was given an empty value"):
        from_flags(ServerConfig, build_parser().parse_args(["serve", "--api-key", ""]))
    assert main(["serve", "--api-key", " "]) == 2


def test_zero_or_an_empty_variable_means_the_default_and_a_renamed_variable_is_refused(monkeypatch):
    from freelunch.cli import main
    from freelunch.config import EngineConfig, ServerConfig, from_flags

    for name, value in (("FREELUNCH_MAX_MODEL_LEN", "0"), ("FREELUNCH_RATE_LIMIT_RPM", "0"), ("FREELUNCH_PLAYGROUND", ""),
                        ("FREELUNCH_PREFIX_CACHE_BLOCKS", "-1"), ("FREELUNCH_MAX_NUM_BATCHED_TOKENS", "0")):
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve", "--threads", "0", "--enforce-eager", "--no-enforce-eager"])
    engine, server = from_flags(EngineConfig, args), from_flags(ServerConfig, args)
    assert (engine.max_model_len, engine.prefix_cache_blocks, engine.max_num_batched_tokens, engine.num_threads) == (None,) * 4
    assert server.rate_limit_rpm is None and server.playground is True and engine.enforce_eager is False
    monkeypatch.setenv("FREELUNCH_NO_PREFIX_CACHING", "1")
    with pytest.raises(ValueError, match="FREELUNCH_PREFIX_CACHING=0"):
        build_parser()
    assert main(["serve"]) == 2
