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
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch
import xgrammar as xgr

from freelunch.constraints.json_layout import json_grammar_options
from freelunch.engine.request import ConstraintSpec

_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
CACHE_ENTRIES = 256  # compiled grammars kept per process (LRU)
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


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, with an LRU of compiled grammars by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.compile_seconds: list[float] = []  # drained by whoever reports metrics

    def compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        key = (spec.kind, spec.value, spec.whitespace)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        start = time.perf_counter()
        compiled = self._compile(spec)
        with self._lock:
            self.compile_seconds.append(time.perf_counter() - start)
            self._cache[key] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        if len(spec.value) > MAX_SPEC_CHARS:
            raise GrammarError(f"the {spec.kind} is longer than {MAX_SPEC_CHARS} characters")
        c = self._compiler
        try:
            if spec.kind in ("json_schema", "json_object"):
                return c.compile_grammar(json_grammar(spec))
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "choice":
                return c.compile_grammar(choice_as_grammar(json.loads(spec.value)))
            if spec.kind == "grammar":
                return c.compile_lark(spec.value) if is_lark(spec.value) else c.compile_grammar(spec.value)
            if spec.kind == "structural_tag":
                return c.compile_structural_tag(xgr.StructuralTag.model_validate_json(spec.value))
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse and schema errors
            detail = _XGRAMMAR_PREFIX.sub("", str(e).strip())  # "[12:00:00] /project/cpp/x.cc:42: "
            raise GrammarError(f"the {spec.kind.replace('_', ' ')} cannot be compiled: {detail}") from None
        raise GrammarError(f"unknown constraint kind {spec.kind!r}")


class GrammarState:
    """One request's position in its grammar: the mask of allowed next tokens, and the tokens
    taken (with rollback, for drafts that a verification rejects)."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=-1)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] with every token the grammar forbids next at -inf (a new tensor)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        out = logits.clone()
        xgr.apply_token_bitmask_inplace(out[None, : self.vocab_size], self.bitmask)
        return out

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def rollback(self, count: int) -> None:
        if count:
            self.matcher.rollback(count)

    def jump_forward(self) -> str:
        """The text the grammar forces next, whatever the model says ("" when it allows a choice)."""
        return self.matcher.find_jump_forward_string()

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()
