"""Constraints on the distribution a request selects from: OpenAI's `logit_bias`, and grammars
(JSON schemas, regexes, choices, EBNF, tool-call structures; grammar.py).

A request that carries any gets one `Constraint`. The engine applies it to the logits of every
token it selects, whoever selects: the sampler for a plain or combined (guided, contrasted)
distribution, a draft verification for each node on its path. So a constraint composes with every
method, and neither the engine nor the methods know what kind of constraint it is.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch

from freelunch.constraints.grammar import GrammarCompiler, GrammarError, GrammarState
from freelunch.engine import plugins
from freelunch.engine.request import GenerationRequest

__all__ = ["Constraint", "ConstraintFactory", "GrammarError"]


class Constraint:
    """Logit bias, then a grammar's mask, on one request's selected distribution; the grammar's
    state follows the accepted tokens (accept / rollback)."""

    def __init__(self, bias: dict[int, float] | None, grammar: GrammarState | None) -> None:
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long) if bias else None
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None
        self.grammar = grammar
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
        return out

    def note(self, logits: torch.Tensor, constrained: torch.Tensor) -> None:
        """Count a selection whose top choice the constraint changed."""
        if int(torch.argmax(constrained)) != int(torch.argmax(logits)):
            self.masked_tokens += 1

    def accept(self, token: int) -> bool:
        """The selected token moves the grammar on; False if the grammar refuses it."""
        return self.grammar.accept(token) if self.grammar is not None else True

    def rollback(self, count: int) -> None:
        if self.grammar is not None and count:
            self.grammar.rollback(count)
            self.rollbacks += count

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

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._compiler

    def prepare(self, request: GenerationRequest) -> Future | None:
        """None when the request's constraint can be built at once, else a future that completes
        when its grammar is compiled (off the calling thread: an engine loop keeps stepping)."""
        return self.compiler.prepare(request.constraint) if request.constraint is not None else None

    def build(self, request: GenerationRequest) -> Constraint | None:
        """The request's constraint, or None; GrammarError / ValueError for one that cannot apply."""
        bias = request.logit_bias or None
        if bias and any(not 0 <= t < self.vocab_size for t in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        grammar = None
        if request.constraint is not None:
            grammar = GrammarState(self.compiler.compile(request.constraint), self.vocab_size)
        if bias is None and grammar is None:
            return None
        return Constraint(bias, grammar)


plugins.CONSTRAINTS.append(ConstraintFactory)
