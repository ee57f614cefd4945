"""Classifier-free guidance inside vLLM: a batch-level logits processor over paired rows.

A guided request is two vLLM requests, decoded in the same batch: `cond` (the prompt) and
`uncond` (the negative prompt, or the last prompt token), tagged through
`SamplingParams.extra_args[EXTRA_KEY]`. At a step where both rows are present and have produced
the same number of tokens, both rows' logits become the guided values (the native engine's
formula, `freelunch.methods.guidance`). The two requests share their sampling parameters and
seed, so they sample the same token and stay in lockstep.

vLLM's scheduler does not know they are a pair: it may run one row without the other (admitted
in different steps, or one of them preempted). A token sampled then is unguided. This processor
never guides such a step; it records the pair as broken, with how many tokens were guided, and
the adapter (vllm_engine.py) drops the unguided tokens and restarts the pair from there. The
record is a process-wide table: the adapter runs vLLM's engine core in its own process, so the
processor and the adapter share memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from freelunch.methods.guidance import guide
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

EXTRA_KEY = "freelunch_guidance"

_lock = threading.Lock()
_broken: dict[str, int] = {}  # pair id -> tokens decoded under guidance before the break


def take_break(pair: str) -> int | None:
    """How many tokens of `pair` were guided before it fell out of lockstep (None: it has not);
    the record is consumed."""
    with _lock:
        return _broken.pop(pair, None)


def forget(pair: str) -> None:
    with _lock:
        _broken.pop(pair, None)


def _record_break(pair: str, guided: int) -> None:
    with _lock:
        _broken[pair] = min(guided, _broken.get(pair, guided))


@dataclass(slots=True)
class _Row:
    pair: str
    role: str  # "cond" or "uncond"
    scale: float
    rescale: float | None
    output_ids: list[int]  # vLLM's live list of the request's output tokens


class PairedGuidance(LogitsProcessor):
    """Registered with the engine (`logits_processors=[PairedGuidance]`); active for rows whose
    `extra_args` carry EXTRA_KEY."""

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}  # persistent-batch index -> guided row

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        tag = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if tag is None:
            return
        if not isinstance(tag, dict) or tag.get("role") not in ("cond", "uncond") or not isinstance(tag.get("pair"), str):
            raise ValueError(f"extra_args.{EXTRA_KEY} must be {{pair, role, scale, rescale}}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            tag = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
            if tag is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(tag["pair"], tag["role"], float(tag["scale"]), tag.get("rescale"), output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        pairs: dict[str, dict[str, int]] = {}
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                pairs.setdefault(row.pair, {})[row.role] = index
        for pair, roles in pairs.items():
            cond, uncond = roles.get("cond"), roles.get("uncond")
            if cond is None or uncond is None:
                present = self.rows[cond if cond is not None else uncond]
                _record_break(pair, len(present.output_ids))
                continue
            c_row, u_row = self.rows[cond], self.rows[uncond]
            if len(c_row.output_ids) != len(u_row.output_ids):
                _record_break(pair, min(len(c_row.output_ids), len(u_row.output_ids)))
                continue
            guided = guide(logits[cond].float(), logits[uncond].float(), c_row.scale, c_row.rescale)
            logits[cond] = guided.to(logits.dtype)
            logits[uncond] = guided.to(logits.dtype)
        return logits
