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
    return filter_rows(logits[None], [p])[0]


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`filter_logits` over rows [R, vocab], each with its own parameters, in one pass of each kind
    (a GPU step's rows then cost one launch a filter, not one each)."""
    vocab = logits.shape[-1]
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device)[:, None]
    logits = logits / column([p.temperature for p in params], logits.dtype)
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        k = column(top_k, torch.long)
        # the k-th largest value of each row: a top-k of the largest k asked, not a sort of the vocabulary
        kth = torch.topk(logits, max(top_k), dim=-1).values.gather(1, (k - 1).clamp(min=0))
        logits = logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = column([p.top_p for p in params], logits.dtype)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays:
        # a top_p that rounds to 0 in the logits' dtype would drop everything)
        drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(p.min_p > 0.0 for p in params):
        min_p = column([p.min_p for p in params], logits.dtype)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
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
    rows take one argmax over all of them (a call per row cost ~0.1 ms each at the default vocab);
    sampled rows are filtered together (`filter_rows`), then each draws with its own generator."""
    greedy = [i for i, row in enumerate(rows) if _plain_greedy(row)] if len(rows) > 1 else []
    out: list[tuple[int, TokenLogprob | None]] = [(0, None)] * len(rows)
    if greedy:
        tokens = torch.stack([rows[i].logits for i in greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, tokens):
            out[i] = (token, None)
    batched = set(greedy)
    rest = [i for i in range(len(rows)) if i not in batched]
    prepared = {i: _penalised(rows[i]) for i in rest}
    drawn = [i for i in rest if not rows[i].params.greedy]
    tokens: dict[int, int] = {}
    if drawn:
        probs = filter_rows(torch.stack([prepared[i] for i in drawn]), [rows[i].params for i in drawn]).softmax(-1)
        tokens = {i: int(torch.multinomial(row_probs, 1, generator=rows[i].generator)) for i, row_probs in zip(drawn, probs)}
    for i in rest:
        row = rows[i]
        token = tokens[i] if i in tokens else int(torch.argmax(prepared[i]))
        record = None
        if row.params.logprobs is not None:
            record = top_logprobs(torch.log_softmax(row.logits, -1), token, row.params.logprobs)
        out[i] = (token, record)
    return out


def _penalised(row: SampleRow) -> torch.Tensor:
    """The row's logits with min_tokens' stop-token mask and its penalties (a copy when it has any)."""
    p = row.params
    masked = len(row.output_ids) < p.min_tokens and row.stop_ids
    if not (p.penalised or masked):
        return row.logits
    logits = row.logits.clone()
    if masked:
        logits[list(row.stop_ids)] = float("-inf")
    if p.penalised:
        apply_penalties(logits, p, row.prompt_ids, row.output_ids)
    return logits
