"""What a decoding method declares, once, in its own module: `MethodSpec`.

A method is found through the `freelunch.methods` entry-point group (pyproject.toml; ours register
there as a third party's would: `methods/__init__.py` loads them). The API builds the request
schema from the specs (each option's pydantic model is a field of the request body, so its types,
bounds and defaults are in /openapi.json and a bad value is a 400 naming it before admission), the
CLI adds their server flags, the metrics their counters, the engine builds a request's strategy
from them, and the pool routes on their names and the engines they run on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

# A token id as a request may carry it: bounded here (msgpack and torch take int64 at most); the
# engine checks it against the served vocabulary.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class MethodOptions(BaseModel):
    """Base of a method's options model: unknown fields and loose types (`"1.5"`, `true` for a
    number) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True, slots=True)
class PromptField:
    """An option field that holds a prompt the API renders into token ids before the request
    reaches the engine: `kind` "text" (tokenised like a completions prompt) or "chat" (a message
    list, rendered with the chat template and a generation prompt), into the field `ids`."""

    kind: str
    ids: str


@dataclass(frozen=True, slots=True)
class ServerFlag:
    """A `freelunch serve` flag of a method's (also read from FREELUNCH_<NAME>): a server-wide
    default for its option, which a request's own value replaces."""

    name: str  # "--speculative"
    help: str
    choices: tuple[str, ...]
    default: str
    options: Callable[[str], dict[str, Any] | None]  # the flag's value -> the option's default (None: no default)


@dataclass(frozen=True, slots=True)
class MethodMetric:
    """A Prometheus counter a method declares, counted from its `usage.method_stats` entry as each
    generation finishes."""

    name: str  # "freelunch_..."
    help: str
    # the method's stats of one generation -> (label values, increment) pairs
    read: Callable[[dict[str, Any]], list[tuple[tuple[str, ...], float]]]
    labels: tuple[str, ...] = ()


# SamplingParams.extra_args key of a paired row's tag on vLLM: {option, pair, role ("main" or
# "extra"), seed, and the method's own fields}; the method's logits processor reads it
PAIR_KEY = "freelunch_pair"


@dataclass(frozen=True, slots=True)
class PairStart:
    """A request's start as a pair of vLLM requests: the second row's prompt, the fields the
    method's processor reads from the tag, and its `usage.method_stats` entry (the adapter adds
    the rows' counts and restarts)."""

    extra_prompt: list[int]
    tag: dict[str, Any]
    stats: dict[str, Any]


class PairedRows(Protocol):
    """How a method runs on vLLM (backends/vllm_engine.py): its request and a second one beside it,
    kept in lockstep by the method's logits processor, which forces a row's token unlike its
    partner's wherever it could not run the pair together; the adapter restarts a pair after the
    two rows' common tokens."""

    def processor(self, use_v2_model_runner: bool) -> type:
        """The logits processor class for the model runner vLLM picked."""
        ...

    def start(self, request: Any, vocab_size: int, max_model_len: int) -> PairStart | None:
        """The pair for `request` (None: it decodes plainly); EngineError naming the field vLLM cannot run."""
        ...


@dataclass(frozen=True, slots=True)
class BenchCase:
    """How `freelunch bench` measures a method beside plain decoding."""

    options: dict[str, Any] | None  # the request's value of the option; None: not measured (`skip` says why)
    skip: str = ""
    # a lossless speed-up (plain decoding's output, sooner): measured on chats the server has not
    # seen, after a warm-up on others, then on the same chats again, outputs compared with plain's;
    # `per_step` names its stat of tokens decoded a step
    lossless: bool = False
    per_step: str = ""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    option: str  # the request body field
    options: type[MethodOptions]  # validated at the API and again by the engine
    description: str  # one line, for /openapi.json
    # (request, main row, model info) -> its pipeline Stage (or, alone, a whole DecodingStrategy)
    build: Callable[..., Any]
    # why a request with these parameters decodes without the method (None: it does not); known
    # before it runs, so that the API can say so in a header as well as in `usage.method_stats`
    fallback: Callable[[Any], str | None] | None = None
    # options that mean "not this method" (a request opting out of a server default)
    off: Callable[[dict[str, Any]], bool] = lambda options: False
    # the pipeline stages it fills (methods/pipeline.py): prefill_transform, row_expansion,
    # combination, selection; and what the served model must have for it (moe, vision)
    stages: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    prompts: dict[str, PromptField] = field(default_factory=dict)
    # chat-request fields that are this option's fields too (`negative_messages` at the top level)
    chat_aliases: tuple[str, ...] = ()
    flags: tuple[ServerFlag, ...] = ()
    metrics: tuple[MethodMetric, ...] = ()
    # the engines that run it ("native", "vllm"); elsewhere the pool routes it to native workers,
    # or refuses it with a 400 naming the option
    engines: frozenset[str] = frozenset({"native"})
    docs: str = ""  # its page, relative to the repository (docs/<method>.md)
    bench: BenchCase | None = None
    # "module:attribute" of its PairedRows (imported only by --engine vllm); "": not on vLLM
    vllm: str = ""
    # the option's value that turns the method off, for a request on a server whose flag defaults it on
    off_options: dict[str, Any] | None = None
    # (takes images, decoder layers) -> the KV cache layer it wants split at by default, or None
    kv_split_hint: Callable[[bool, int], int | None] | None = None
