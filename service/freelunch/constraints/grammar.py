"""Grammars on token ids, with xgrammar (vLLM's default structured-output backend): JSON schemas,
any JSON object, regular expressions, choices, EBNF / Lark grammars and structural tags (tool
calls), compiled once per tokenizer and cached, matched token by token with rollback.

Why xgrammar: it is what vLLM runs (so `--engine vllm` and the native engine constrain with the
same grammar), it ships CPU wheels beside torch 2.13, compiles a nested schema in milliseconds,
fills a next-token bitmask in tens of microseconds, and its matcher rolls back, which draft
verification needs. The settings follow vLLM's xgrammar backend (backend_xgrammar.py), so that
both engines compile the same grammar for the same request.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xgrammar as xgr

from freelunch.constraints.json_layout import json_grammar_options
from freelunch.engine.messages import ConstraintSpec

_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_SOURCE_PATH = re.compile(r"\S*/\S+\.(?:h|hpp|cc|cpp|c|py):\d+:?\s*")  # a build's source file and line
MAX_ERROR_CHARS = 300
CACHE_BYTES = 256 << 20  # compiled grammars kept per worker (LRU, by xgrammar's own size count)
COMPILE_NICENESS = 10
MAX_SPEC_CHARS = 1 << 16  # a schema, regex or grammar as the request holds it


class GrammarError(ValueError):
    """A grammar that cannot be compiled (the API answers 400)."""


def choice_as_grammar(choices: list[str]) -> str:
    """`root ::= "a" | "b"`, the literals escaped for EBNF (as vLLM's choice_as_grammar)."""

    def escape(ch: str) -> str:
        table = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}
        if ch in table:
            return table[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(escape(c) for c in choice) + '"' for choice in choices)


def json_grammar(spec: ConstraintSpec) -> xgr.Grammar:
    """The grammar of a json_schema or json_object spec with its whitespace layout: what both
    engines compile (vLLM receives it as EBNF), so that they constrain alike."""
    schema = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
    return xgr.Grammar.from_json_schema(schema, **json_grammar_options(spec.whitespace))


def is_lark(grammar: str) -> bool:
    """Lark (`rule: ...`) rather than EBNF (`rule ::= ...`), as vLLM tells them apart."""
    for line in grammar.split("\n"):
        line = re.sub(r"(#|//).*$", "", line).strip()
        if line:
            return "::=" not in line
    return False


def clean_error(text: str) -> str:
    """xgrammar's message as a client may read it: no timestamp, no build path, no echo of the
    whole grammar (messages quote what they failed on)."""
    text = _XGRAMMAR_PREFIX.sub("", text.strip())  # "[12:00:00] /project/cpp/x.cc:42: "
    text = _SOURCE_PATH.sub("", text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def compile_spec(compiler: xgr.GrammarCompiler, spec: ConstraintSpec) -> xgr.CompiledGrammar:
    """`spec` compiled by xgrammar's `compiler`; GrammarError for one that cannot be."""
    if len(spec.value) > MAX_SPEC_CHARS:
        raise GrammarError(f"the {spec.kind} is longer than {MAX_SPEC_CHARS} characters")
    try:
        if spec.kind in ("json_schema", "json_object"):
            return compiler.compile_grammar(json_grammar(spec))
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_as_grammar(json.loads(spec.value)))
        if spec.kind == "grammar":
            return compiler.compile_lark(spec.value) if is_lark(spec.value) else compiler.compile_grammar(spec.value)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(xgr.StructuralTag.model_validate_json(spec.value))
    except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse and schema errors
        raise GrammarError(clean_error(f"the {spec.kind.replace('_', ' ')} cannot be compiled: {e}")) from None
    raise GrammarError(f"unknown constraint kind {spec.kind!r}")


def tokenizer_info_json(tokenizer: Any, vocab_size: int) -> str:
    """xgrammar's view of a tokenizer, as JSON (what a compile process rebuilds it from)."""
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).serialize_json()


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, with an LRU of compiled grammars bounded in bytes.

    `prepare` compiles on a background thread (xgrammar releases the GIL while it compiles), one
    compile per grammar however many requests ask, at a lower CPU priority: an engine loop hands a
    new grammar here and keeps decoding the other requests until it is ready. The API admits only
    grammars that compiled within its limit (compile_guard.py), so a worker's compile ends too."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_bytes: int = CACHE_BYTES) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[tuple, Future] = {}
        # its thread yields the CPU to the engine's (Linux: niceness is per thread)
        self._pool = ThreadPoolExecutor(
            1, "grammar-compile", initializer=lambda: lower_priority(threading.get_native_id(), COMPILE_NICENESS)
        )

    @staticmethod
    def key(spec: ConstraintSpec) -> tuple[str, str, str]:
        """What identifies a compiled grammar (a string bound is applied on the output, not in it)."""
        return (spec.kind, spec.value, spec.whitespace)

    def cached(self, spec: ConstraintSpec) -> xgr.CompiledGrammar | None:
        key = self.key(spec)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def prepare(self, spec: ConstraintSpec) -> Future | None:
        """None when `spec` is compiled already, else a future that completes (with the compiled
        grammar or its GrammarError) once it is, compiled off the calling thread."""
        key = self.key(spec)
        with self._lock:
            if key in self._cache:
                return None
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = self._pool.submit(self._compile_and_keep, key, spec)
            return pending

    def compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        """`spec` compiled, from the cache or now (waiting for a compile already under way)."""
        while True:  # (a grammar cached a moment ago may have been evicted since)
            compiled = self.cached(spec)
            if compiled is not None:
                return compiled
            pending = self.prepare(spec)
            if pending is not None:
                return pending.result()

    def _compile_and_keep(self, key: tuple, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        try:
            compiled = compile_spec(self._compiler, spec)
            size = compiled.memory_size_bytes
            with self._lock:
                self._cache[key] = compiled
                self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached_bytes -= old.memory_size_bytes
            return compiled
        finally:
            with self._lock:
                self._pending.pop(key, None)


def lower_priority(pid_or_tid: int, niceness: int) -> None:
    """Set a process's (or, on Linux, a thread's) niceness, where the system lets us."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid_or_tid, niceness)
    except (AttributeError, OSError):
        pass
