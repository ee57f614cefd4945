"""Constraints on the distribution a request selects from: OpenAI's `logit_bias`, and grammars
(JSON schemas, regexes, choices, EBNF, tool-call structures; grammar.py).

A request that carries any gets one `Constraint`. The engine applies it to the logits of every
token it selects, whoever selects: the sampler for a plain or combined (guided, contrasted)
distribution, a draft verification for each node on its path. So a constraint composes with every
method, and neither the engine nor the methods know what kind of constraint it is.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import xgrammar as xgr

from freelunch.constraints.grammar import GrammarCompiler, GrammarError
from freelunch.engine import plugins
from freelunch.engine.messages import GenerationRequest

__all__ = ["Constraint", "ConstraintFactory", "GrammarError"]


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


class TokenText:
    """What the string bound needs of a vocabulary: each token's bytes, and which tokens begin
    with a double quote (those that can close a JSON string)."""

    def __init__(self, token_bytes: list) -> None:
        self.bytes = [bytes(b) for b in token_bytes]
        self.closes = torch.tensor([b[:1] == b'"' for b in self.bytes], dtype=torch.bool)


class StringBound:
    """Ends a JSON string that runs past `limit` characters: from then on only tokens that close
    it may follow, where the grammar lets it close there (a pattern or a minLength may not). It
    follows the output's text with a small JSON lexer, accepted token by token, with rollback.

    Why not `maxLength` in the grammar: xgrammar compiles a bounded string in ~1.6 s per schema on
    2 cores (any length over ~200), against milliseconds unbounded."""

    def __init__(self, limit: int, text: TokenText) -> None:
        self.limit = limit
        self.text = text
        self._states: list[tuple[bool, bool, int]] = [(False, False, 0)]  # (in a string, after \, characters)

    def advance(self, token: int) -> None:
        inside, escaped, count = self._states[-1]
        for byte in self.text.bytes[token] if 0 <= token < len(self.text.bytes) else b"":
            if not inside:
                inside, count = byte == 0x22, 0
            elif escaped:
                escaped, count = False, count + 1
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                inside = False
            elif byte & 0xC0 != 0x80:  # not a UTF-8 continuation byte: a character starts
                count += 1
        self._states.append((inside, escaped, count))

    def rollback(self, count: int) -> None:
        del self._states[len(self._states) - count :]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        inside, escaped, count = self._states[-1]
        if not inside or escaped or count < self.limit:
            return logits
        closes = self.text.closes[: logits.shape[-1]]
        if not bool(torch.isfinite(logits[closes]).any()):  # the grammar does not let it close here
            return logits
        return logits.masked_fill(~closes, float("-inf"))


class Constraint:
    """Logit bias, then a grammar's mask, then the string bound, on one request's selected
    distribution; the grammar's state and the bound's follow the accepted tokens (accept /
    rollback)."""

    def __init__(self, bias: dict[int, float] | None, grammar: GrammarState | None, strings: StringBound | None = None) -> None:
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long) if bias else None
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None
        self.grammar = grammar
        self.strings = strings
        self.masked_tokens = 0  # selections whose top choice the constraint changed
        self.rollbacks = 0  # grammar tokens taken back (draft nodes a verification rejected)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] -> constrained logits (a new tensor): bias added, forbidden tokens -inf."""
        out = logits
        if self.bias_ids is not None:
            out = out.clone()
            out[self.bias_ids] += self.bias_values.to(out.dtype)
        if self.grammar is not None:
            out = self.grammar.mask(out)
        if self.strings is not None:
            out = self.strings.mask(out)
        return out

    def note(self, logits: torch.Tensor, constrained: torch.Tensor) -> None:
        """Count a selection whose top choice the constraint changed."""
        if int(torch.argmax(constrained)) != int(torch.argmax(logits)):
            self.masked_tokens += 1

    def accept(self, token: int) -> bool:
        """The selected token moves the grammar on; False if the grammar refuses it."""
        if self.grammar is not None and not self.grammar.accept(token):
            return False
        if self.strings is not None:
            self.strings.advance(token)
        return True

    def rollback(self, count: int) -> None:
        if self.grammar is not None and count:
            self.grammar.rollback(count)
            self.rollbacks += count
        if self.strings is not None and count:
            self.strings.rollback(count)

    def allows(self, token: int) -> bool:
        """Whether the grammar takes `token` next (state unchanged)."""
        if self.grammar is None:
            return True
        if self.grammar.accept(token):
            self.grammar.rollback(1)
            return True
        return False

    @property
    def finished(self) -> bool:
        """The grammar has taken its stop token: no token may follow."""
        return self.grammar is not None and self.grammar.finished

    def forced_text(self) -> str:
        """What the grammar forces next ("" without a grammar or where it allows a choice)."""
        return self.grammar.jump_forward() if self.grammar is not None else ""

    def stats(self) -> dict[str, Any]:
        return {"masked_tokens": self.masked_tokens, "rollbacks": self.rollbacks}


class ConstraintFactory:
    """Builds requests' constraints for one model (its tokenizer and vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None  # built at the first grammar: ~0.5 s
        self._text: TokenText | None = None  # built at the first string bound
        self._lock = threading.Lock()
        self._setup: ThreadPoolExecutor | None = None  # builds the compiler off the engine loop

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
            return self._compiler

    def prepare(self, request: GenerationRequest) -> Future | None:
        """None when the request's constraint can be built at once, else a future that completes
        when its grammar is compiled (off the calling thread: an engine loop keeps stepping). The
        first grammar also builds the compiler (its tokenizer tables: ~0.5 s) there."""
        spec = request.constraint
        if spec is None:
            return None
        if self._compiler is None:
            with self._lock:
                if self._setup is None:
                    self._setup = ThreadPoolExecutor(1, "grammar-setup")
            return self._setup.submit(lambda: self.compiler.compile(spec))
        return self._compiler.prepare(spec)

    def build(self, request: GenerationRequest) -> Constraint | None:
        """The request's constraint, or None; GrammarError / ValueError for one that cannot apply."""
        bias = request.logit_bias or None
        if bias and any(not 0 <= t < self.vocab_size for t in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        grammar = strings = None
        if request.constraint is not None:
            grammar = GrammarState(self.compiler.compile(request.constraint), self.vocab_size)
            if request.constraint.max_string > 0:
                if self._text is None:
                    self._text = TokenText(self.compiler.info.decoded_vocab)
                strings = StringBound(request.constraint.max_string, self._text)
        if bias is None and grammar is None:
            return None
        return Constraint(bias, grammar, strings)


def install_constraints() -> None:
    """Constraints for the engines this process builds (once, explicitly: nothing registers on import)."""
    plugins.CONSTRAINTS[:] = [ConstraintFactory]
