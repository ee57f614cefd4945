"""`freelunch serve --help` describes every flag, with its default where it has one."""

from __future__ import annotations

import argparse

import pytest
from freelunch.cli import build_parser


def _serve() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


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
    environ = {"FREELUNCH_NO_PREFIX_CACHING": "1", "FREELUNCH_PREFIX_CACHING": "0", "FREELUNCH_CACHE_DIR": "/c",
               "FREELUNCH_CPU_LINEAR": "torch", "FREELUNCH_SPECULATIVE": "token_recycling", "FREELUNCH_MAX_NUMSEQS": "4"}
    assert unknown_env(flags, environ) == ["FREELUNCH_MAX_NUMSEQS", "FREELUNCH_NO_PREFIX_CACHING"]


def test_a_variable_outside_its_choices_is_refused_naming_it(monkeypatch):
    from freelunch.cli import main

    monkeypatch.setenv("FREELUNCH_LOG_LEVEL", "WARNING")  # case aside, a choice
    assert build_parser().parse_args(["serve", "--dtype", "Float32"]).log_level == "warning"
    for name, value in (("FREELUNCH_DTYPE", "fp8"), ("FREELUNCH_SPECULATIVE", "medusa")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"{name}='{value}' is not one of"):
            build_parser()
        assert main(["serve"]) == 2
        monkeypatch.delenv(name)
