"""OpenAI request and response schemas (plus vLLM's sampling extensions and our method options)."""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from freelunch.constraints.json_layout import (
    ANY_WHITESPACE_MAX,
    DEFAULT_MAX_NUMBER_DIGITS,
    DEFAULT_MAX_STRING_LENGTH,
    DEFAULT_WHITESPACE,
    TOOL_WHITESPACE_MAX,
    Whitespace,
)
from freelunch.methods.spec import TokenId

# Fields of OpenAI's and vLLM's request schemas that would change the output and that this server
# does not serve: a 400 naming the field, never a plausible 200 that silently ignored it. A field
# is refused when present with a value other than its no-op one (here; None = any value but null).
UNSERVED_FIELDS: dict[str, object] = {
    "functions": None,
    "function_call": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "logits_processors": None,
    "truncate_prompt_tokens": None,
    "prompt_logprobs": None,
    "use_beam_search": False,
    "skip_special_tokens": True,
    "return_tokens_as_token_ids": False,
    "audio": None,
    "web_search_options": None,
    "chat_template": None,
    "chat_template_kwargs": None,
    "documents": None,
    "echo": False,  # chat (vLLM); a declared field of completions
    "modalities": ["text"],
    "reasoning_effort": None,  # would reach a reasoning model's chat template
    "verbosity": None,
    "spaces_between_special_tokens": True,
}
# Fields OpenAI's and vLLM's clients send that change no output: accepted and ignored. Any other
# field this server does not declare is a 400 naming it, as OpenAI's API answers
# ("Unrecognized request argument"), unless the server runs with --ignore-unknown-fields.
NO_OP_FIELDS = frozenset({
    "store", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "prediction",  # predicted outputs: a speed hint, the output is the same
    "request_id", "priority", "cache_salt",  # vLLM: bookkeeping, scheduling, its prefix cache
})
UNSERVED_MESSAGE_FIELDS: dict[str, object] = {"function_call": None, "audio": None}


def unserved(fields: dict[str, Any] | None, table: dict[str, object]) -> str | None:
    """The first field of `fields` (a model's extras) that `table` refuses with this value."""
    for name, value in (fields or {}).items():
        if name in table and value is not None and value != table[name]:
            return name
    return None


def unknown_fields(req: BaseModel) -> list[str]:
    """The request's fields that neither its schema declares nor the tables above know."""
    return [k for k in (req.model_extra or {}) if k not in NO_OP_FIELDS and k not in UNSERVED_FIELDS]

MAX_INT = 2**31 - 1  # every integer field is bounded (msgpack and torch stop at 64 bits; nothing needs more)
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128
MAX_CHOICES = 1024  # structured_outputs.choice entries


class JSONSchemaFormat(BaseModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its names, 0.32): one of json, regex, choice, grammar,
    json_object, structural_tag. Ours beside them: how JSON may look where its schema does not say
    (whitespace, free strings and numbers), for this field's JSON and for `response_format` and
    `tools`: send `structured_outputs` with only these fields beside those."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = Field(default=False, description='the same as json_whitespace "compact"')
    json_whitespace: Whitespace | None = Field(
        default=None,
        description=f'"single" (default): one space after `,` and `:`, nowhere else; "compact": none; "any": any '
        f"whitespace, at most {ANY_WHITESPACE_MAX} characters between two tokens. Tool-call arguments: at most "
        f"{TOOL_WHITESPACE_MAX['single']} character ({ANY_WHITESPACE_MAX} with any)",
    )
    max_string_length: int | None = Field(
        default=DEFAULT_MAX_STRING_LENGTH,
        ge=1,
        le=1 << 20,
        description="characters a JSON string (a value or a key) may run to before only its closing quote may "
        "follow (where the grammar lets it close); a schema's own larger maxLength raises it; tool arguments: under "
        "tool_choice required or a named function; null: no bound",
    )
    max_number_digits: int | None = Field(
        default=DEFAULT_MAX_NUMBER_DIGITS,
        ge=1,
        le=18,
        description="digits before the point of a JSON number whose schema sets no minimum / maximum (then also "
        "at most 6 after it, no exponent); null: no bound",
    )

    def constraint_kind(self) -> str | None:
        """The constraint this field sets itself, if any (it may carry JSON options only)."""
        kinds = {"json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                 "json_object": self.json_object or None, "structural_tag": self.structural_tag}
        given = [k for k, v in kinds.items() if v is not None]
        if len(given) > 1:
            raise ValueError("give at most one of json, regex, choice, grammar, json_object, structural_tag")
        return given[0] if given else None

    def whitespace(self) -> Whitespace:
        return self.json_whitespace or ("compact" if self.disable_any_whitespace else DEFAULT_WHITESPACE)


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Other fields are kept aside (`model_extra`): those in
    UNSERVED_FIELDS are refused unless they hold their no-op value, those in NO_OP_FIELDS are
    ignored, and any other is a 400 naming it (api/building.py), unless --ignore-unknown-fields."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=MAX_INT)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    user: str | None = Field(default=None, max_length=256)
    timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds; at most the server's limit")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024, description="token id -> bias in [-100, 100]")
    # the method options' fields, one per registered method (`with_methods`)
    method_names: ClassVar[tuple[str, ...]] = ()

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_LENGTH} characters")
        return [s for s in stops if s]

    def method_options(self) -> dict[str, dict[str, Any]]:
        """The method options the request set, as plain values (what crosses to the workers)."""
        chosen = {name: getattr(self, name) for name in self.method_names if getattr(self, name) is not None}
        return {name: options.model_dump(exclude_unset=True) for name, options in chosen.items()}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # see UNSERVED_MESSAGE_FIELDS

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)  # an assistant's earlier calls
    tool_call_id: str | None = Field(default=None, max_length=128)  # a tool message: the call it answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # chat fields that belong to a method's options too (`MethodSpec.chat_aliases`), by option
    method_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)


def with_methods(base: type[SamplingFields], specs: dict[str, Any], chat: bool) -> type[SamplingFields]:
    """`base` with a field per method option (its pydantic options model: validated, and in
    /openapi.json), and for chat each method's top-level aliases."""
    fields: dict[str, Any] = {
        name: (spec.options | None, Field(default=None, description=spec.description)) for name, spec in specs.items()
    }
    aliases: dict[str, tuple[str, ...]] = {}
    if chat:
        for name, spec in specs.items():
            for alias in spec.chat_aliases:
                info = spec.options.model_fields[alias]
                fields[alias] = (info.annotation, Field(default=None, description=f"the same as `{name}.{alias}`"))
            aliases[name] = spec.chat_aliases
    model = create_model(base.__name__, __base__=base, **fields)
    model.method_names = tuple(specs)
    if chat:
        model.method_aliases = aliases
    return model


# ---- responses ---------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    method_stats: dict[str, Any] | None = None


class MethodCard(BaseModel):
    """A decoding method the model is served with (extension): its request field, its options'
    JSON schema and what the model must have for it; the playground page builds its form from these."""

    option: str
    description: str
    options_schema: dict[str, Any]
    requires: list[str] = Field(default_factory=list)
    # the server's default for this option (its flag), applied to every request that does not set
    # the option; `off_options`, the value with which a request opts out of it
    server_default: dict[str, Any] | None = None
    off_options: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "freelunch"
    max_model_len: int | None = None
    # extensions: the methods a request may add, and whether image inputs are served
    methods: list[MethodCard] | None = None
    images: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
