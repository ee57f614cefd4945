"""The engine loop: schedule, run the model, post-process (as nano-vllm's `step`)."""

from __future__ import annotations

import hashlib
import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from freelunch.config import EngineConfig
from freelunch.engine import plugins
from freelunch.engine.block_manager import BlockManager, BlockNeed
from freelunch.engine.detokenizer import IncrementalText
from freelunch.engine.errors import EngineError, check_new_request
from freelunch.engine.kv_cache import KVCache, kv_cache_dtype
from freelunch.engine.model_info import ModelInfo
from freelunch.engine.model_runner import ModelRunner
from freelunch.engine.request import (
    FinishReason,
    GenerationRequest,
    InputEmbeds,
    RequestOutput,
    Sequence,
    TokenLogprob,
    image_tensor,
)
from freelunch.engine.sampler import SampleRow, sample, top_logprobs
from freelunch.engine.scheduler import Scheduler
from freelunch.engine.strategy import DecodingStrategy, Sampled
from freelunch.kernels import triton_kernels_enabled
from freelunch.models.loader import LoadedModel


@dataclass(slots=True)
class RequestState:
    request: GenerationRequest
    strategy: DecodingStrategy
    generator: torch.Generator | None
    text: IncrementalText
    stop_ids: tuple[int, ...]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    pending_prompt_logprobs: bool = False
    first_token_time: float | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    new_tokens: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    constraint: Any = None  # what the selected tokens must follow (constraints/): logit bias, a grammar

    @property
    def main(self) -> Sequence:
        return self.strategy.main

    @property
    def tenant(self) -> str | None:
        return self.request.tenant


def _kv_blocks(
    config: EngineConfig, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, takes_images: bool
) -> BlockManager:
    """Blocks for `kv_cache_gib`: one pool, or a split cache with `kv_lower_blocks_ratio` lower
    blocks (few layers each) per upper block."""
    split = config.kv_split_layer
    if split == -1:  # the layer a registered method asks for (visual pruning, for vision models)
        split = plugins.kv_split_hint(takes_images, num_layers)
    if split >= num_layers:
        raise ValueError(f"kv_split_layer must be below the model's {num_layers} layers")
    block_layer_bytes = KVCache.bytes_per_token(1, num_kv_heads, head_dim, dtype) * config.block_size
    budget = int(config.kv_cache_gib * (1 << 30))
    cached = config.prefix_cache_blocks if config.enable_prefix_caching else 0
    if split <= 0:
        return BlockManager(max(1, budget // (block_layer_bytes * num_layers)), config.block_size, cache_blocks=cached)
    ratio = config.kv_lower_blocks_ratio
    upper = max(1, int(budget / (block_layer_bytes * (ratio * split + num_layers - split))))
    return BlockManager(max(1, int(upper * ratio)), config.block_size, upper, (split, num_layers), cached)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.model = loaded.model
        self.kernels = loaded.kernels  # what runs the linears (models/loader.py kernel_variant), for /metrics
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(config.device)
        cfg = loaded.model.config
        self.max_model_len = config.context_length(cfg.max_position_embeddings)
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, next(loaded.model.parameters()).dtype, self.device)
        takes_images = hasattr(loaded.model, "encode_images")
        self.blocks = _kv_blocks(config, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype, takes_images)
        split = self.blocks.split
        upper = (split, self.blocks.upper.num_blocks * config.block_size) if split is not None else None
        slots = self.blocks.num_blocks * config.block_size
        self.kv = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, kv_dtype, self.device, upper)
        triton = triton_kernels_enabled(config.triton_kernels, self.device.type)
        if triton:
            self.kernels = f"{self.kernels}+triton"
        self.runner = ModelRunner(loaded.model, self.kv, self.blocks, self.device, triton)
        self.scheduler = Scheduler(
            self.blocks,
            config.max_num_seqs,
            config.native_batched_tokens,
            config.scheduling_policy,
            config.long_prefill_token_threshold,
        )
        eos = set(cfg.eos_token_ids)
        if getattr(loaded.tokenizer, "eos_token_id", None) is not None:
            eos.add(loaded.tokenizer.eos_token_id)
        self.info = ModelInfo(
            loaded.name,
            cfg,
            loaded.hf_config,
            loaded.tokenizer,
            tuple(sorted(eos)),
            self.max_model_len,
            config.device,
            vision=loaded.model if takes_images else None,
            max_num_batched_tokens=config.native_batched_tokens,
            forward_cost=self.runner.forward_cost,
            kv_split_layer=self.blocks.split,
            max_step_cost=config.max_step_cost,
        )
        self.constraints = plugins.constraint_builder(loaded.tokenizer, cfg.vocab_size)  # None: no constraint package
        self.requests: dict[str, RequestState] = {}
        self._aborted: list[RequestState] = []
        self.stats = {"steps": 0, "preemptions": 0, "prompt_tokens": 0, "generation_tokens": 0}

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        check_new_request(request, self.requests, self.max_model_len, self.vocab_size)
        main = Sequence(list(request.prompt_token_ids), len(request.prompt_token_ids))
        try:
            strategy = plugins.build_strategy(request, main, self.info)
        except ValueError as e:
            raise EngineError(str(e), getattr(e, "param", None)) from e
        self._place_images(request, strategy)
        self._name_prefixes(request, strategy)
        constraint = self._constraint(request)
        strategy.constraint = constraint  # a strategy that selects tokens itself (drafts) applies it too
        if not self._fits_in_cache(strategy):
            capacity = self.blocks.capacity_tokens
            need = sum(seq.num_tokens + strategy.tokens_needed() for seq in strategy.rows)
            raise EngineError(f"the request needs {need} KV slots; the cache holds {capacity}", "messages")
        p = request.params
        generator = None
        if not p.greedy:
            generator = torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
        stop_ids = tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.info.eos_token_ids))))
        state = RequestState(
            request,
            strategy,
            generator,
            IncrementalText(self.tokenizer, p.stop, p.include_stop_str_in_output),
            stop_ids,
            pending_prompt_logprobs=p.prompt_logprobs is not None,
            constraint=constraint,
        )
        self.requests[request.request_id] = state
        self.scheduler.add(state)
        self.stats["prompt_tokens"] += main.num_prompt

    def prepare(self, request: GenerationRequest) -> Future | None:
        """Work a request needs before `add_request` that must not run in the engine loop (its
        grammar's compile): None when there is none, else a future the loop waits on while it
        keeps stepping the other requests."""
        if request.constraint is None or self.constraints is None:
            return None
        return self.constraints.prepare(request)

    def _constraint(self, request: GenerationRequest) -> Any:
        if request.constraint is None and not request.logit_bias:
            return None
        if self.constraints is None:
            raise EngineError("constraints (structured outputs, logit_bias) are not available on this engine", "response_format")
        p = request.params
        if request.constraint is not None and (p.ignore_eos or p.min_tokens):
            # the grammar ends the output with a stop token where these forbid one
            raise EngineError("a structured output cannot be combined with ignore_eos or min_tokens", "ignore_eos" if p.ignore_eos else "min_tokens")
        try:
            return self.constraints.build(request)
        except ValueError as e:
            raise EngineError(str(e), "response_format" if request.constraint is not None else "logit_bias") from e

    def _place_images(self, request: GenerationRequest, strategy: DecodingStrategy) -> None:
        """Image features take the place of the prompt's placeholder tokens: the i-th image owns the
        i-th run of `tokens_per_image` placeholders (as transformers' LLaVA). Where the strategy keeps
        fewer features for an image, that many of its placeholders leave the prompt."""
        vision, main = self.info.vision, strategy.main
        if vision is None:
            if request.images:
                raise EngineError(f"the model `{self.info.name}` does not accept images", "messages")
            return
        placeholders = [i for i, t in enumerate(main.token_ids) if t == vision.image_token_id]
        per_image = vision.tokens_per_image
        if len(placeholders) != len(request.images) * per_image:
            raise EngineError(
                f"the prompt holds {len(placeholders)} image placeholder tokens; "
                f"{len(request.images)} image(s) take {per_image} each",
                "messages",
            )
        if not request.images:
            return
        dtype = next(self.model.parameters()).dtype
        try:
            pixels = torch.stack([image_tensor(image) for image in request.images]).to(self.device, dtype)
            with torch.inference_mode():
                features = strategy.image_features(vision, pixels)
        except ValueError as e:
            raise EngineError(f"bad image input: {e}", "messages") from e
        dropped = set()
        for i, image_features in enumerate(features):
            dropped.update(placeholders[i * per_image + image_features.shape[0] : (i + 1) * per_image])
        ids = [t for i, t in enumerate(main.token_ids) if i not in dropped]
        offsets = [i for i, t in enumerate(ids) if t == vision.image_token_id]
        main.token_ids, main.num_prompt = ids, len(ids)
        main.input_embeds = InputEmbeds(torch.tensor(offsets), torch.cat(features))

    def _name_prefixes(self, request: GenerationRequest, strategy: DecodingStrategy) -> None:
        """Each row's prefix-cache key: what besides its tokens changes its KV (the tenant's salt,
        its images, its routing). A request that asks for prompt logprobs computes its whole prompt
        (a cached prefix has no logits) and shares nothing."""
        if not self.blocks.caching or request.params.prompt_logprobs is not None:
            return
        salt = request.tenant if self.config.prefix_cache_salt == "per-key" else None
        for seq in strategy.rows:
            extras = strategy.cache_extras(seq)
            if extras is None:
                continue
            key = hashlib.blake2b(repr((salt, sorted(extras.items()))).encode(), digest_size=16)
            if seq.input_embeds is not None:
                key.update(seq.input_embeds.offsets.numpy().tobytes())
                key.update(seq.input_embeds.values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            seq.cache_key = key.digest()

    def abort(self, request_id: str) -> bool:
        state = self.requests.get(request_id)
        if state is None:
            return False
        state.finish_reason = FinishReason.ABORT.value
        self._aborted.append(state)
        return True

    def has_work(self) -> bool:
        return bool(self.requests)

    # ---- what the worker and pool read (the same surface as backends/vllm_engine.py) ----------
    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def vocab_size(self) -> int:
        return self.info.config.vocab_size

    @property
    def capabilities(self) -> frozenset[str]:
        """Request options and inputs this engine serves, and what its model has that a method may
        require (a spec's `requires`: "moe", "vision")."""
        images = {"images", "vision"} if self.info.vision is not None else set()
        moe = {"moe"} if self.info.config.moe is not None else set()
        constraints = {"constraint"} | {f"{m}+constraint" for m in plugins.STRATEGIES} if self.constraints is not None else set()
        return frozenset(plugins.STRATEGIES) | images | moe | constraints

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def prefix_cache_blocks(self) -> int:
        return self.blocks.cached_blocks

    @property
    def prefix_cache_evictions(self) -> int:
        return self.blocks.cache_stats.evictions

    @property
    def steps_by_path(self) -> dict[str, int]:
        """Forwards by the path the model's layers took (one C call, per layer)."""
        return dict(getattr(self.model, "steps_by_path", {}))

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for state in self._aborted:
            if self.requests.pop(state.request.request_id, None) is not None:
                self.scheduler.remove(state)
                outputs.append(self._output(state, finished=True))
        self._aborted.clear()
        batch = self.scheduler.schedule()
        self.stats["preemptions"] += batch.preempted
        if not batch.plans:
            return outputs
        self.stats["steps"] += 1
        logits = self.runner.run(batch.plans)
        for plan in batch.plans:
            if plan.advance:
                plan.seq.num_computed += len(plan.tokens)

        to_sample: list[tuple[RequestState, torch.Tensor]] = []
        decided: list[tuple[RequestState, list[Sampled]]] = []
        plans_by_seq = {p.seq.seq_id: p for p in batch.plans}
        for state in batch.requests:
            if state.pending_prompt_logprobs:
                self._collect_prompt_logprobs(state, plans_by_seq.get(state.main.seq_id), logits)
            if state.request.params.max_tokens == 0:  # scoring only (echo + logprobs)
                if not state.pending_prompt_logprobs and state.main.pending == 0:
                    state.finish_reason = FinishReason.LENGTH.value
                continue
            result = state.strategy.on_logits(logits, self)
            if isinstance(result, torch.Tensor):
                to_sample.append((state, result))
            elif result:
                decided.append((state, result))
        if to_sample:
            # constraints apply to the distribution the strategy chose (plain, guided, contrasted)
            selected = [(s, lg if s.constraint is None else s.constraint.apply(lg), lg) for s, lg in to_sample]
            rows = [
                SampleRow(lg, s.request.params, s.generator, s.main.token_ids[: s.main.num_prompt], s.main.output_ids, s.stop_ids)
                for s, lg, _ in selected
            ]
            for (state, constrained, raw), (token, record) in zip(selected, sample(rows)):
                if state.constraint is not None:
                    state.constraint.note(raw, constrained)
                decided.append((state, [Sampled(token, record)]))
        now = time.monotonic()
        for state, tokens in decided:
            if state.first_token_time is None:
                state.first_token_time = now
            for tok in tokens:
                self._accept(state, tok)
                if state.finish_reason is not None:
                    break
        for plan in batch.plans:  # name the blocks the step filled with committed tokens
            self.blocks.register_committed(plan.seq)
        for state in batch.requests:
            finished = state.finish_reason is not None
            if state.new_tokens or finished:
                outputs.append(self._output(state, finished))
            if finished:
                self.requests.pop(state.request.request_id, None)
                self.scheduler.remove(state)
        return outputs

    def _accept(self, state: RequestState, tok: Sampled) -> None:
        p = state.request.params
        if state.constraint is not None and not state.constraint.accept(tok.token_id):
            state.finish_reason = FinishReason.ERROR.value  # a selection outside the grammar: a bug, not an answer
            return
        state.strategy.append(tok.token_id)
        state.num_output_tokens += 1
        self.stats["generation_tokens"] += 1
        state.new_tokens.append(tok.token_id)
        if tok.logprob is not None:
            state.new_logprobs.append(tok.logprob)
        if tok.token_id in state.stop_ids and state.num_output_tokens > p.min_tokens:
            state.finish_reason = FinishReason.STOP.value
            return
        state.text.add(tok.token_id)
        if state.text.stopped and state.num_output_tokens >= p.min_tokens:
            state.finish_reason = FinishReason.STOP.value
        elif (
            state.num_output_tokens >= p.max_tokens
            or state.main.num_tokens >= self.max_model_len
            or not self._fits_in_cache(state.strategy)  # could never be scheduled again
        ):
            state.finish_reason = FinishReason.LENGTH.value

    def _fits_in_cache(self, strategy: DecodingStrategy) -> bool:
        """Whether the request's next step fits in the whole KV cache (the scheduler's admission test)."""
        need = sum((self.blocks.holding(seq, seq.num_tokens + strategy.tokens_needed()) for seq in strategy.rows), BlockNeed())
        return self.blocks.could_ever_hold(need)

    def _collect_prompt_logprobs(self, state: RequestState, plan, logits: dict[int, torch.Tensor]) -> None:
        """Logprob of each prompt token under the model given the tokens before it (echo)."""
        main = state.main
        if plan is None or main.seq_id not in logits:
            return
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first token has no context
        start = main.num_computed - len(plan.tokens)
        rows = logits[main.seq_id]
        k = state.request.params.prompt_logprobs or 0
        for row, i in zip(rows, plan.logits_at):
            nxt = start + i + 1
            if nxt < main.num_prompt and len(state.prompt_logprobs) == nxt:
                state.prompt_logprobs.append(top_logprobs(torch.log_softmax(row, -1), main.token_ids[nxt], k))
        if len(state.prompt_logprobs) >= main.num_prompt:
            state.pending_prompt_logprobs = False

    def _output(self, state: RequestState, finished: bool) -> RequestOutput:
        out = RequestOutput(
            request_id=state.request.request_id,
            new_token_ids=state.new_tokens,
            new_text=state.text.flush(final=finished),
            finished=finished,
            finish_reason=state.finish_reason if finished else None,
            logprobs=state.new_logprobs if state.request.params.logprobs is not None else None,
            num_prompt_tokens=state.main.num_prompt,
            num_output_tokens=state.num_output_tokens,
            num_cached_tokens=min(state.main.num_cached or 0, state.main.num_prompt),
            method_stats=self._method_stats(state) if finished else None,
        )
        if state.prompt_logprobs is not None and not state.pending_prompt_logprobs:
            out.prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, None
        state.new_tokens, state.new_logprobs = [], []
        return out

    @staticmethod
    def _method_stats(state: RequestState) -> dict | None:
        out = dict(state.strategy.method_stats() or {})
        if state.constraint is not None:
            out["structured_output"] = state.constraint.stats()
        return out or None

    # ---- StepContext ---------------------------------------------------------------------
    def commit_kv(self, seq: Sequence, kept_offsets: list[int]) -> None:
        base = seq.num_computed
        kept, moved_to = torch.tensor(kept_offsets), torch.arange(base, base + len(kept_offsets))
        if not torch.equal(kept, moved_to):
            src, dst = self.blocks.slots_at(seq, kept), self.blocks.slots_at(seq, moved_to)
            upper_src = upper_dst = None
            if self.blocks.split is not None:  # the upper table's entries for those offsets (packed after a drop)
                upper_src = self.blocks.upper_slots(seq, _upper_index(seq, kept)).to(self.device)
                upper_dst = self.blocks.upper_slots(seq, _upper_index(seq, moved_to)).to(self.device)
            self.kv.copy_slots(src.to(self.device), dst.to(self.device), upper_src, upper_dst)
        seq.num_computed = base + len(kept_offsets)
        self.blocks.truncate(seq, max(seq.num_computed, seq.num_tokens))

    def check_no_leaks(self) -> None:
        if self.requests:
            raise AssertionError(f"{len(self.requests)} requests still live")
        self.blocks.check_no_leaks()


def _upper_index(seq: Sequence, offsets: torch.Tensor) -> torch.Tensor:
    """Upper-table positions of offsets past a row's prompt: the offset itself, or in a table packed
    by a drop, the kept prompt tokens first (offsets of drafts are never below the drop's base)."""
    if not seq.upper_packed:
        return offsets
    return offsets - seq.drop_base + seq.upper_count(seq.drop_base)
