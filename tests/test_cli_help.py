"""`freelunch serve --help` describes every flag, with its default where it has one."""

from __future__ import annotations

import argparse

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
