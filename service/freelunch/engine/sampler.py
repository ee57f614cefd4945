"""Logits -> tokens for a batch of rows, each with its own parameters and seeded generator.

Order (as vLLM): min_tokens masking, penalties, then logprobs are read from the
(penalty-free) model distribution, then temperature, top-k, top-p, min-p and sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freelunch.engine.request import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SampleRow:
    logits: torch.Tensor  # [vocab] float32
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: tuple[int, ...]  # EOS + stop_token_ids, masked until min_tokens


def apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """In place on one row [vocab]. Repetition penalty sees prompt and output (HF/vLLM); the others output only."""
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        vals = logits[seen]
        limit = torch.finfo(logits.dtype).max  # a tiny penalty must not turn logits into inf (then NaN)
        penalised = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        # a masked token (-inf: min_tokens, a grammar) stays masked: -inf times a penalty that
        # rounds to 0 in float32 would be NaN
        logits[seen] = torch.where(vals == float("-inf"), vals, penalised.clamp(-limit, limit))
    if output_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row [vocab]; filtered entries become -inf."""
    logits = logits / p.temperature
    vocab = logits.shape[-1]
    if p.top_k > 0 and p.top_k < vocab:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False  # a top_p that rounds to 0 in the logits' dtype would drop everything
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = torch.topk(logprobs, k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


def _plain_greedy(row: SampleRow) -> bool:
    """A row whose token is its logits' argmax and nothing more (no penalty, mask or logprobs)."""
    p = row.params
    return p.greedy and not p.penalised and p.logprobs is None and not (len(row.output_ids) < p.min_tokens and row.stop_ids)


def sample(rows: list[SampleRow]) -> list[tuple[int, TokenLogprob | None]]:
    """One token per row, with its logprob record when the row asked for logprobs. Plain greedy
    rows take one argmax over all of them (a call per row cost ~0.1 ms each at the default vocab)."""
    greedy = [i for i, row in enumerate(rows) if _plain_greedy(row)] if len(rows) > 1 else []
    out: list[tuple[int, TokenLogprob | None]] = [(0, None)] * len(rows)
    if greedy:
        tokens = torch.stack([rows[i].logits for i in greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, tokens):
            out[i] = (token, None)
    batched = set(greedy)
    for i, row in enumerate(rows):
        if i not in batched:
            out[i] = _sample_row(row)
    return out


def _sample_row(row: SampleRow) -> tuple[int, TokenLogprob | None]:
    p = row.params
    logits = row.logits
    needs_copy = p.penalised or (len(row.output_ids) < p.min_tokens and row.stop_ids)
    if needs_copy:
        logits = logits.clone()
    if len(row.output_ids) < p.min_tokens and row.stop_ids:
        logits[list(row.stop_ids)] = float("-inf")
    if p.penalised:
        apply_penalties(logits, p, row.prompt_ids, row.output_ids)
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = filter_logits(logits, p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=row.generator))
    record = None
    if p.logprobs is not None:
        record = top_logprobs(torch.log_softmax(row.logits, -1), token, p.logprobs)
    return token, record
