"""Classifier-free guidance inside vLLM (`--engine vllm`): paired rows (`PairedRows`,
methods/spec.py) and their logits processors, for both of vLLM's model runners. Imported only by
the vLLM adapter (the guidance spec names it).

A guided request is two vLLM requests decoded side by side: `cond` (the prompt, the pair's "main"
row) and `uncond` (the negative prompt, or the last prompt token: the "extra" row), tagged through
`SamplingParams.extra_args[PAIR_KEY]`.
vLLM's scheduler does not know they are a pair, so a step may sample one row without the other
(admitted in different steps, one of them preempted, or one still mid-prefill under chunked
prefill). Each step, for each pair:

- both rows sampled and both with the same number of output tokens: the step is *guided*. Both
  rows get the guided values (the native engine's formula, `freelunch.methods.guidance.guide`);
  a sampling request draws its token here, from the guided values filtered by its temperature,
  top-k, top-p and min-p with the pair's own seeded generator, and both rows get a one-hot of it.
  The two rows then take the same token whatever vLLM's per-row noise does (Model Runner V2
  draws it from the row's position, and the two prompts differ in length).
- otherwise each sampled row of the pair is forced to a token *unlike* the other branch's token
  at the same output index (or token 0 where the other has none there yet).

So the i-th tokens of the two branches are equal exactly when step i was guided for both: the
adapter (vllm_engine.py) reads lockstep from the two output streams alone, keeps their common
prefix and restarts the pair after it. No state is shared with the adapter, so vLLM may run its
engine core in its own process, with CUDA graphs and chunked prefill (a row the V1 runner samples
mid-prefill is discarded by vLLM, and its partner's token from that step is then unlike the
discarded row's real one, so the pair restarts there).

Two classes, one per runner interface: `PairedGuidance` (V1's batch-level processor) and
`PairedGuidanceV2` (Model Runner V2, the default on CUDA since vLLM 0.25, which refuses V1-interface
classes); `GUIDANCE_PAIRS.processor` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from freelunch.engine.errors import EngineError
from freelunch.engine.sampler import filter_logits
from freelunch.methods.guidance import guide, parse_options
from freelunch.methods.spec import PAIR_KEY, PairStart

if TYPE_CHECKING:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

OPTION = "guidance"
ROLES = {"main": "cond", "extra": "uncond"}  # the pair's rows, as guidance names them


def guidance_tag(params: SamplingParams) -> dict | None:
    """The row's tag when it is a guided pair's (other methods' pairs carry their own option)."""
    tag = (params.extra_args or {}).get(PAIR_KEY) if params is not None else None
    return tag if isinstance(tag, dict) and tag.get("option") == OPTION else None


def check_tag(params: SamplingParams) -> None:
    tag = guidance_tag(params)
    if tag is None:
        return
    if tag.get("role") not in ROLES or not isinstance(tag.get("pair"), str) or not isinstance(tag.get("seed"), int):
        raise ValueError(f"extra_args.{PAIR_KEY} must be {{option, pair, role, seed, scale, rescale}}")


@dataclass(slots=True)
class Branch:
    """One guided row's request-constant state."""

    pair: str
    role: str  # "cond" or "uncond"
    scale: float
    rescale: float | None
    seed: int
    params: SamplingParams  # temperature, top-k, top-p, min-p: what a drawn token is filtered by
    generator: torch.Generator | None = None  # the pair's draws (kept on the cond branch)

    @classmethod
    def from_params(cls, params: SamplingParams) -> Branch | None:
        tag = guidance_tag(params)
        if tag is None:
            return None
        return cls(tag["pair"], ROLES[tag["role"]], float(tag["scale"]), tag.get("rescale"), int(tag["seed"]), params)


@dataclass(slots=True)
class Seen:
    """A guided row in this step's logits."""

    branch: Branch
    row: int  # logits row
    count: int  # output tokens before this step's
    sampled: bool  # False: mid-prefill, its token is discarded
    token_at: Callable[[int], int | torch.Tensor | None] = field(repr=False)  # its output token at an index


def steer(logits: torch.Tensor, seen: list[Seen]) -> None:
    """Guide (or force apart) every pair among `seen`, in place on logits [rows, vocab]."""
    pairs: dict[str, dict[str, Seen]] = {}
    for s in seen:
        pairs.setdefault(s.branch.pair, {})[s.branch.role] = s
    for roles in pairs.values():
        cond, uncond = roles.get("cond"), roles.get("uncond")
        if cond is not None and uncond is not None and cond.sampled and uncond.sampled and cond.count == uncond.count:
            _guide_pair(logits, cond, uncond)
            continue
        for s, other in ((cond, uncond), (uncond, cond)):
            if s is not None and s.sampled:
                theirs = other.token_at(s.count) if other is not None else None
                # unlike the other branch's token at this index; 0 when it has none there yet (a
                # token it samples there later is then forced unlike this one)
                _one_hot(logits, s.row, 0 if theirs is None else (theirs + 1) % logits.shape[1])


def _guide_pair(logits: torch.Tensor, cond: Seen, uncond: Seen) -> None:
    b = cond.branch
    guided = guide(logits[cond.row].float(), logits[uncond.row].float(), b.scale, b.rescale)
    if b.params.temperature < 1e-5:  # greedy (vLLM's threshold): both rows take the same argmax
        logits[cond.row] = guided.to(logits.dtype)
        logits[uncond.row] = guided.to(logits.dtype)
        return
    if b.generator is None:
        b.generator = torch.Generator(device=logits.device)
        b.generator.manual_seed(b.seed)
    probs = filter_logits(guided, b.params).softmax(-1)
    token = torch.multinomial(probs, 1, generator=b.generator)[0]  # stays on the device: no host sync
    _one_hot(logits, cond.row, token)
    _one_hot(logits, uncond.row, token)


def _one_hot(logits: torch.Tensor, row: int, token: int | torch.Tensor) -> None:
    logits[row] = float("-inf")
    logits[row, token] = 0.0


class PairedGuidance(V1LogitsProcessor):
    """The V1 model runner's processor (vLLM's CPU build runs this one): rows by persistent-batch
    index, output tokens from vLLM's live per-request lists."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[Branch, list[int]]] = {}  # batch index -> (branch, live output ids)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        check_tag(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            branch = Branch.from_params(params)
            if branch is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (branch, output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            steer(logits, [_seen_v1(index, branch, ids) for index, (branch, ids) in self.rows.items() if index < logits.shape[0]])
        return logits


def _seen_v1(index: int, branch: Branch, output_ids: list[int]) -> Seen:
    def token_at(i: int) -> int | None:
        # -1: a placeholder for a token still in flight (async scheduling): not known here
        return output_ids[i] if i < len(output_ids) and output_ids[i] >= 0 else None

    # the V1 runner does not tell a row mid-prefill; its token is discarded (see the module docstring)
    return Seen(branch, index, len(output_ids), True, token_at)


class PairedGuidanceV2(V2LogitsProcessor):
    """Model Runner V2's processor: requests by slot, rows mapped through `LogitsContext`, lengths
    read from the host-side buffers (no device sync), tokens gathered on the device."""

    def __init__(self, vllm_config: Any, req_states: LogitsProcRequestState) -> None:
        self.req_states = req_states
        self.slots: dict[int, Branch] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        check_tag(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        branch = Branch.from_params(sampling_params)
        if branch is None:
            self.slots.pop(req_idx, None)  # a recycled slot: forget its previous occupant
            return False  # plain requests: this processor costs them nothing
        self.slots[req_idx] = branch
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.slots:
            return logits
        slots = ctx.idx_mapping_np
        if logits.shape[0] != len(slots):
            # one row per request is what lets a batch position name a row; the adapter never
            # configures vLLM's draft-token decoding, which gives a request several rows
            raise RuntimeError("guided pairs need one logits row per request (no vLLM draft tokens)")
        states = self.req_states
        seen = []
        for row, slot in enumerate(slots.tolist()):
            branch = self.slots.get(slot)
            if branch is None:
                continue
            prompt_len = int(states.prompt_len.np[slot])
            seq_len = int(ctx.seq_lens_upper_bound_np[row])  # exact without draft tokens
            count = max(0, seq_len - prompt_len)
            sampled = seq_len >= int(states.prefill_len.np[slot])  # not mid-prefill
            seen.append(Seen(branch, row, count, sampled, _token_at_v2(states, slot, prompt_len, count)))
        steer(logits, seen)
        return logits


def _token_at_v2(states: LogitsProcRequestState, slot: int, prompt_len: int, count: int) -> Callable[[int], torch.Tensor | None]:
    def token_at(i: int) -> torch.Tensor | None:
        return states.all_token_ids.gpu[slot, prompt_len + i] if i < count else None  # a device scalar

    return token_at


class GuidancePairs:
    """Guidance's `PairedRows`: what the vLLM adapter asks of it."""

    def processor(self, use_v2_model_runner: bool) -> type:
        """The processor for the runner vLLM chose (`VllmConfig.use_v2_model_runner`)."""
        return PairedGuidanceV2 if use_v2_model_runner else PairedGuidance

    def start(self, request: Any, vocab_size: int, max_model_len: int) -> PairStart | None:
        try:
            opts = parse_options(request.methods[OPTION], vocab_size, max_model_len)
        except ValueError as e:
            raise EngineError(str(e), getattr(e, "param", OPTION)) from e
        p = request.params
        if opts.scale == 1 or p.max_tokens == 0:
            return None  # plain decoding, as the native engine
        if request.constraint is not None or request.logit_bias:
            raise EngineError("guidance with a structured output runs on native workers (--native-workers N)", OPTION)
        # The two rows must take the same token from the same guided values; a penalty that reads the
        # prompt (which differs between them) would split them.
        if p.repetition_penalty != 1.0:
            raise EngineError("guidance on the vllm backend does not combine with repetition_penalty", "repetition_penalty")
        if p.logprobs is not None:
            raise EngineError("guidance on the vllm backend does not report logprobs", "logprobs")
        uncond = opts.negative_prompt_ids or [request.prompt_token_ids[-1]]
        return PairStart(list(uncond), {"scale": opts.scale, "rescale": opts.rescale}, {"scale": opts.scale})


GUIDANCE_PAIRS = GuidancePairs()
